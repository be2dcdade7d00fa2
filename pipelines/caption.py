"""Caption images with a registered captioner: shards or a folder of images in, Parquet or JSON Lines out.

    python pipelines/caption.py data=data/shards/emoji                        # the latest clipforge-clipcap
    python pipelines/caption.py model=models:/clipforge-clipcap/2 data=/photos output=/photos-captions \\
        output_format=jsonl generate.method=nucleus generate.top_p=0.8

Steps: read the images with Ray Data (undecodable ones are kept with an error) -> captioner actors (each loads the
pyfunc model) -> files written by Ray (one per block) -> accounting (every input row is in the output) and an
MLflow run with the counts and a preview.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from components.runtime import one_line_errors, route_overrides
from components.stages import caption

REPO = Path(__file__).resolve().parents[1]


@hydra.main(config_path="../conf", config_name="caption", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("caption", ValueError, FileNotFoundError, FileExistsError):
        caption.run(cfg)


if __name__ == "__main__":
    # `model=` and `data=` name config groups elsewhere in conf/: here they are values
    sys.argv = route_overrides(sys.argv, {"model": "model_uri", "data": "data_path"}, REPO / "conf")
    main()
