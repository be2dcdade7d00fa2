"""AltCLIP: a multilingual text tower for a trained CLIP, in two stages on Ray Train + DeepSpeed
(pipelines/distill_altclip.py); in the chain, distilled from the pretrained CLIP."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from components import storage
from components.data.sources import ensure_shards
from components.runtime import check_typed_settings, init_ray
from components.stages.wiring import Wiring, model_exists, quoted, registered_uri
from components.tracking import mlflow_runs
from components.workflow import Outputs, Stage


def run(cfg: DictConfig) -> dict[str, Any]:
    from components.eval.runner import fetch_model
    from components.train import altclip

    check_typed_settings(cfg, "stage1", "stage2")
    init_ray(cfg.ray.address, cfg.ray.num_cpus or 2 * (os.cpu_count() or 1))
    shard_dir = ensure_shards(cfg, "altclip")
    mlflow_runs.configure(cfg.mlflow.experiment)
    teacher = fetch_model(str(cfg.teacher), storage.location(cfg.work_dir) / "teacher")
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
