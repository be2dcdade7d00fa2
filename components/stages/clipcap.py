"""ClipCap: captions from a trained CLIP's image embeddings, on Ray Train + DeepSpeed (pipelines/train_clipcap.py);
in the chain, on the pretrained CLIP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from components.stages.wiring import Wiring, model_exists, quoted, registered_uri, shards_and_model
from components.tracking import mlflow_runs
from components.workflow import Outputs, Stage


def run(cfg: DictConfig) -> dict[str, Any]:
    from components.caption import training

    shard_dir, clip = shards_and_model(cfg, "clipcap", "clip", "lm", "caption")
    sweep = sweep_parent(cfg)
    with mlflow_runs.start_run(cfg.mlflow.run_name, cfg.mlflow.experiment,
                               tags={"stage": "clipcap", "clip.uri": clip.uri}, parent_run_id=sweep) as run:
        mlflow_runs.log_params(OmegaConf.to_container(cfg, resolve=True))
        outcome = training.run(cfg, shard_dir, clip, run.info.run_id)

    print(training.summary(outcome))
    print(f"MLflow run {run.info.run_id} at {mlflow_runs.tracking_uri()}  (see it: make mlflow-ui)")
    if sweep:
        client = MlflowClient()
        table = training.log_sweep_summary(client, run.info.experiment_id, sweep)
        client.set_terminated(sweep)
        print(f"sweep so far (parent run {sweep}):\n{training.markdown_table(table.drop(columns='run_id'))}")
    return outcome


def sweep_parent(cfg: DictConfig) -> str | None:
    """Under `-m` (Hydra multirun) every run of the sweep nests under one parent run, found by the sweep's
    directory (the first run creates it); the sweep's table and chart are logged there. None for a single run,
    including one called with a composed config (pipelines/end_to_end.py's stage)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = str(Path(hydra_cfg.runtime.output_dir).resolve().parent)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    found = client.search_runs([experiment.experiment_id], f"tags.`clipcap.sweep` = '{sweep_dir}'")
    if found:
        return found[0].info.run_id
    parent = client.create_run(experiment.experiment_id, run_name=f"{cfg.mlflow.run_name}-sweep",
                               tags={"stage": "clipcap-sweep", "clipcap.sweep": sweep_dir})
    return parent.info.run_id


def outputs(cfg: DictConfig) -> Outputs:
    outcome = run(cfg)
    return {"model_uri": registered_uri(outcome), "heldout": outcome.get("heldout")}


def stage(wiring: Wiring) -> Stage:
    def config(up: dict[str, Outputs], out: str) -> DictConfig:
        return wiring.on_model("train_clipcap", "clipcap", up, "clip", f"export_dir={quoted(out)}")

    return Stage("clipcap", ("ingest", "pretrain"), config, outputs, model_exists)
