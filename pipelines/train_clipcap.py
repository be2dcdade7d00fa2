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

import hydra
from omegaconf import DictConfig

from components.data.ingest import IngestError
from components.runtime import one_line_errors
from components.stages import clipcap


@hydra.main(config_path="../conf", config_name="train_clipcap", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("clipcap", IngestError, ValueError, FileNotFoundError):
        clipcap.run(cfg)


if __name__ == "__main__":
    main()
