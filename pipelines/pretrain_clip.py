"""Contrastive pretraining (CLIP, FILIP, CLIPPO) on Ray Train workers running DeepSpeed ZeRO.

    python pipelines/pretrain_clip.py                          # tiny CLIP on the built-in corpus, 2 CPU workers
    python pipelines/pretrain_clip.py model=filip deepspeed=zero3 trainer.samples=100000
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python pipelines/pretrain_clip.py model=clippo

Steps: ingest the shards if missing -> tokenizer (trained BPE or a given one) -> Ray Data input -> TorchTrainer
with DeepSpeed -> consolidate the last checkpoint into an export (save_pretrained + tokenizer) -> held-out
retrieval -> MLflow: params, curves, plots, the export as a pyfunc model in the registry.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from components.data.ingest import IngestError
from components.data.url_list import UrlListError
from components.runtime import one_line_errors
from components.stages import pretrain


@hydra.main(config_path="../conf", config_name="pretrain_clip", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("pretrain", IngestError, UrlListError, ValueError, FileNotFoundError):
        pretrain.run(cfg)


if __name__ == "__main__":
    main()
