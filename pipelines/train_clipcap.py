"""ClipCap: captions from a trained CLIP's image embeddings, on Ray Train + DeepSpeed.

    python pipelines/train_clipcap.py                                 # the latest clipforge-clip, built-in corpus
    python pipelines/train_clipcap.py clip=models:/clipforge-clip/3 caption.mapping=transformer
    python pipelines/train_clipcap.py -m caption.prefix_length=1,10,20   # a sweep: one child run per value
    python pipelines/train_clipcap.py -m caption.mapping=mlp,transformer caption.prefix_length=10,20

Steps: resolve the CLIP model -> its image embeddings (Ray Data, cached) -> tokenizer -> decoder LM pretraining
(child run) -> ClipCap training (child run) -> held-out BLEU/CIDEr vs the nearest-neighbour baseline, training
captions reproduced -> the captioner (image bytes -> caption) as a pyfunc in the registry. In a sweep the
decoder's LM pretraining runs once (cached by captions and settings) and a parent run holds the summary table
and chart (sweep/summary.md, sweep/summary.png).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from components import storage
from components.data.ingest import IngestError
from components.data.sources import ensure_shards
from components.runtime import check_typed_settings, init_ray, one_line_errors
from components.tracking import mlflow_runs


@hydra.main(config_path="../conf", config_name="train_clipcap", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("clipcap", IngestError, ValueError, FileNotFoundError):
        train(cfg)


def train(cfg: DictConfig) -> dict[str, Any]:
    from components.caption import training
    from components.eval.runner import fetch_model

    check_typed_settings(cfg, "lm", "caption")
    init_ray(cfg.ray.address, cfg.ray.num_cpus or 2 * (os.cpu_count() or 1))
    shard_dir = ensure_shards(cfg, "clipcap")
    mlflow_runs.configure(cfg.mlflow.experiment)
    clip = fetch_model(str(cfg.clip), storage.location(cfg.work_dir) / "clip")
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


if __name__ == "__main__":
    main()
