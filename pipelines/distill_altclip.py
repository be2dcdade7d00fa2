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

import hydra
from omegaconf import DictConfig

from components.data.ingest import IngestError
from components.data.parallel_text import ParallelTextError
from components.runtime import one_line_errors
from components.stages import altclip


@hydra.main(config_path="../conf", config_name="distill_altclip", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("altclip", IngestError, ParallelTextError, ValueError, FileNotFoundError):
        altclip.run(cfg)


if __name__ == "__main__":
    main()
