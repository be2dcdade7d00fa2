"""Contrastive pretraining (CLIP, FILIP, CLIPPO) on Ray Train workers running DeepSpeed ZeRO.

    python pipelines/pretrain_clip.py                          # tiny CLIP on the built-in corpus, 2 CPU workers
    python pipelines/pretrain_clip.py model=filip deepspeed=zero3 trainer.samples=100000
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python pipelines/pretrain_clip.py model=clippo

Steps: ingest the shards if missing -> tokenizer (trained BPE or a given one) -> Ray Data input -> TorchTrainer
with DeepSpeed -> consolidate the last checkpoint into an export (save_pretrained + tokenizer) -> held-out
retrieval -> MLflow: params, curves, plots, the export as a pyfunc model in the registry.
"""

from __future__ import annotations

import os
from typing import Any

import hydra
import mlflow
from omegaconf import DictConfig, OmegaConf

from components.data import shard_sets
from components.data.ingest import IngestError
from components.data.sources import ensure_shards
from components.data.url_list import UrlListError
from components.runtime import check_typed_settings, init_ray, one_line_errors
from components.tracking import mlflow_runs


@hydra.main(config_path="../conf", config_name="pretrain_clip", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("pretrain", IngestError, UrlListError, ValueError, FileNotFoundError):
        pretrain(cfg)


def pretrain(cfg: DictConfig) -> dict[str, Any]:
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


if __name__ == "__main__":
    main()
