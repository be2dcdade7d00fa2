"""Contrastive pretraining (CLIP, FILIP, CLIPPO) on Ray Train + DeepSpeed (pipelines/pretrain_clip.py); in the
chain, on the ingested shards and again on the CLIP-score filter's kept pairs."""

from __future__ import annotations

import os
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf

from components.data import shard_sets
from components.data.sources import ensure_shards
from components.runtime import check_typed_settings, init_ray
from components.stages.wiring import Wiring, model_exists, quoted, registered_uri, stage_config
from components.tracking import mlflow_runs
from components.workflow import Outputs, Stage


def run(cfg: DictConfig) -> dict[str, Any]:
    from components.train import pretraining

    check_typed_settings(cfg)
    pretraining.check_settings(cfg)
    init_ray(cfg.ray.address, cfg.ray.num_cpus or 2 * (os.cpu_count() or 1))
    shard_dir = ensure_shards(cfg, "pretrain")

    with mlflow_runs.start_run(cfg.mlflow.run_name, cfg.mlflow.experiment,
                               tags={"stage": "pretrain", "family": cfg.model.family}) as run:
        mlflow_runs.log_params(OmegaConf.to_container(cfg, resolve=True))
        manifest = shard_sets.manifest(shard_dir)
        if manifest is not None:
            mlflow_runs.log_json(manifest, "data/manifest.json")
        samples, counted_from = shard_sets.sample_count(shard_dir)
        mlflow.set_tag("data.counted_from", counted_from)
        mlflow_runs.log_metrics({"data.kept": samples})
        outcome = pretraining.run(cfg, shard_dir, run.info.run_id)

    print(pretraining.summary(outcome))
    print(f"MLflow run {run.info.run_id} at {mlflow_runs.tracking_uri()}  (see it: make mlflow-ui)")
    return outcome


def config(wiring: Wiring, up: dict[str, Outputs], out: str, stage: str = "pretrain", shards: str = "ingest",
           suffix: str = "") -> DictConfig:
    extra = [f"registry.model_name=clipforge-${{model.family}}{suffix}", f"mlflow.run_name=pretrain{suffix}"]
    return stage_config("pretrain_clip", wiring.overrides(stage, *wiring.corpus, wiring.shards_of(up, shards),
                                                          f"export_dir={quoted(out)}", *extra))


def outputs(cfg: DictConfig) -> Outputs:
    outcome = run(cfg)
    return {"model_uri": registered_uri(outcome), "heldout": outcome.get("heldout")}


def stage(wiring: Wiring) -> Stage:
    return Stage("pretrain", ("ingest",), lambda up, out: config(wiring, up, out), outputs, model_exists)


def filtered_stage(wiring: Wiring) -> Stage:
    """Pretraining on the CLIP-score filter's kept pairs (DataComp's loop), registered as
    clipforge-<family>-filtered."""
    return Stage("pretrain_filtered", ("clip_filter",),
                 lambda up, out: config(wiring, up, out, "pretrain_filtered", "clip_filter", "-filtered"), outputs,
                 model_exists)
