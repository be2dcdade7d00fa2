"""AltCLIP: a multilingual text tower for a trained CLIP, in two stages on Ray Train + DeepSpeed
(pipelines/distill_altclip.py); in the chain, distilled from the pretrained CLIP."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from components.stages.wiring import Wiring, model_exists, quoted, registered_uri, shards_and_model
from components.tracking import mlflow_runs
from components.workflow import Outputs, Stage


def run(cfg: DictConfig) -> dict[str, Any]:
    from components.train import altclip

    shard_dir, teacher = shards_and_model(cfg, "altclip", "teacher", "stage1", "stage2")
    with mlflow_runs.start_run(cfg.mlflow.run_name, cfg.mlflow.experiment,
                               tags={"stage": "altclip", "teacher.uri": teacher.uri}) as run:
        mlflow_runs.log_params(OmegaConf.to_container(cfg, resolve=True))
        outcome = altclip.run(cfg, shard_dir, teacher, run.info.run_id)

    print(altclip.summary(outcome, cfg))
    print(f"MLflow run {run.info.run_id} at {mlflow_runs.tracking_uri()}  (see it: make mlflow-ui)")
    return outcome


def outputs(cfg: DictConfig) -> Outputs:
    return {"model_uri": registered_uri(run(cfg)["stage2"])}


def stage(wiring: Wiring) -> Stage:
    def config(up: dict[str, Outputs], out: str) -> DictConfig:
        return wiring.on_model("distill_altclip", "altclip", up, "teacher", f"export_dir={quoted(out)}",
                               f"work_dir={quoted(out + '-work')}")

    return Stage("altclip", ("ingest", "pretrain"), config, outputs, model_exists)
