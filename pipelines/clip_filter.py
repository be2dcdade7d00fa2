"""CLIP-score filter (DataComp): a trained model scores every image-text pair of a shard directory; the best
pairs become a new shard directory to train on.

    python pipelines/clip_filter.py                                   # the latest clipforge-clip, salted corpus
    python pipelines/clip_filter.py model=models:/clipforge-clip/3 data=/data/pool output=/data/pool_top30 \\
        filter.keep_fraction=0.3
    python pipelines/pretrain_clip.py data=emoji_salted data.output_dir=data/shards/emoji_salted_filtered

Steps: resolve the model -> Ray Data actors score each shard (cosine of the image and caption embeddings) ->
threshold or top fraction over the rows in scope -> filtered shards + _dropped/ (with scores) + manifest ->
MLflow run: counts, threshold, score histogram, precision/recall against a truth column when there is one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from components.runtime import one_line_errors, route_overrides
from components.stages import clip_filter

REPO = Path(__file__).resolve().parents[1]


@hydra.main(config_path="../conf", config_name="clip_filter", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("clip-filter", ValueError, FileNotFoundError):
        clip_filter.run(cfg)


if __name__ == "__main__":
    sys.argv = route_overrides(sys.argv, {"model": "model_uri", "data": "data_path"}, REPO / "conf",
                               keep_choices=("data",))
    main()
