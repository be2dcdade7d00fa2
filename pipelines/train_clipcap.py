"""ClipCap: captions from a trained CLIP's image embeddings, on Ray Train + DeepSpeed.

    python pipelines/train_clipcap.py                                 # the latest clipforge-clip, built-in corpus
    python pipelines/train_clipcap.py clip=models:/clipforge-clip/3 caption.mapping=transformer
    python pipelines/train_clipcap.py -m caption.prefix_length=1,10,20   # one run per prefix length

Steps: resolve the CLIP model -> its image embeddings (Ray Data, cached) -> tokenizer -> decoder LM pretraining
(child run) -> ClipCap training (child run) -> held-out BLEU/CIDEr vs the nearest-neighbour baseline, training
captions reproduced -> the captioner (image bytes -> caption) as a pyfunc in the registry.
"""

from __future__ import annotations

import os
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from components.data.ingest import IngestError
from components.data.sources import ensure_shards
from components.runtime import init_ray, one_line_errors, path
from components.tracking import mlflow_runs


@hydra.main(config_path="../conf", config_name="train_clipcap", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("clipcap", IngestError, ValueError, FileNotFoundError):
        train(cfg)


def train(cfg: DictConfig) -> dict[str, Any]:
    from components.caption import training
    from components.eval.runner import fetch_model

    init_ray(cfg.ray.address, cfg.ray.num_cpus or 2 * (os.cpu_count() or 1))
    shard_dir = ensure_shards(cfg, "clipcap")
    mlflow_runs.configure(cfg.mlflow.experiment)
    clip = fetch_model(str(cfg.clip), path(cfg.work_dir) / "clip")
    with mlflow_runs.start_run(cfg.mlflow.run_name, cfg.mlflow.experiment,
                               tags={"stage": "clipcap", "clip.uri": clip.uri}) as run:
        mlflow_runs.log_params(OmegaConf.to_container(cfg, resolve=True))
        outcome = training.run(cfg, shard_dir, clip, run.info.run_id)

    print(training.summary(outcome))
    print(f"MLflow run {run.info.run_id} at {mlflow_runs.tracking_uri()}  (see it: make mlflow-ui)")
    return outcome


if __name__ == "__main__":
    main()
