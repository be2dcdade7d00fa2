"""Evaluate any registered or exported model on any shards: zero-shot classification, retrieval, linear probe,
multilingual retrieval, typographic attack and token alignment maps.

    python pipelines/evaluate.py                                       # the latest clipforge-clip, built-in corpus
    python pipelines/evaluate.py model=models:/clipforge-filip/1 tasks=[retrieval,zeroshot_classification]
    python pipelines/evaluate.py model=data/models/clip data=/data/my_shards fields=webdataset \\
        where={} tasks=[retrieval]

Steps: resolve the model (MLflow registry / run / directory) -> read the rows with Ray Data -> embed images
(and texts) with model actors, streamed to disk -> each task blockwise -> results JSON (CLIP_benchmark's shape)
+ plots -> an MLflow run nested under the model's training run, headline metrics as registry version tags.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from components.runtime import one_line_errors, route_overrides
from components.stages import evaluate

REPO = Path(__file__).resolve().parents[1]


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("evaluate", ValueError, FileNotFoundError, KeyError):
        evaluate.run(cfg)


if __name__ == "__main__":
    sys.argv = route_overrides(sys.argv, {"model": "model_uri", "data": "data_path"}, REPO / "conf",
                               keep_choices=("data",))
    main()
