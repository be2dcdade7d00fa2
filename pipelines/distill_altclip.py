"""AltCLIP: a multilingual text tower for a trained CLIP, in two stages on Ray Train + DeepSpeed.

    python pipelines/distill_altclip.py                                   # teacher: the latest clipforge-clip
    python pipelines/distill_altclip.py teacher=models:/clipforge-clip/3 stage1.trainer.samples=400000
    python pipelines/distill_altclip.py parallel_text.path=pairs.tsv student.pretrained=xlm-roberta-base

Steps: resolve the teacher -> parallel text (built in, or a file) -> student tokenizer -> the teacher's features
of every English sentence (Ray Data, cached) -> stage 1: MSE teacher learning (child run) -> stage 2: contrastive
training with the image tower locked (child run) -> register the final model -> multilingual retrieval of the
teacher, the stage-1 student and the final model on held-out concepts.
"""

from __future__ import annotations

import os
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from components import storage
from components.data.ingest import IngestError
from components.data.parallel_text import ParallelTextError
from components.data.sources import ensure_shards
from components.runtime import check_typed_settings, init_ray, one_line_errors
from components.tracking import mlflow_runs


@hydra.main(config_path="../conf", config_name="distill_altclip", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("altclip", IngestError, ParallelTextError, ValueError, FileNotFoundError):
        distill(cfg)


def distill(cfg: DictConfig) -> dict[str, Any]:
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


if __name__ == "__main__":
    main()
