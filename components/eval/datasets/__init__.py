"""Standard evaluation datasets in the layouts they are distributed in, read as they are: ImageNet-style class
folders (`image_folder`), COCO and Flickr30k captions in Karpathy's split JSON (`karpathy`), CIFAR-10/100's
Python pickles (`cifar`). Each module's `read(path, split)` returns a `StandardDataset`: the split's rows
(an image file or its bytes, captions, a class) and the class names; `to_ray` turns them into evaluation rows
(components/eval/dataset.py: key, image, captions, label_class), reading image files in Ray tasks.
(CLIP_benchmark's own WebDataset layout is components/eval/benchmark_layout.py.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pandas as pd
import ray

CLASS_LABEL = "class"


@dataclass(frozen=True)
class StandardDataset:
    name: str  # the dataset's layout: image_folder, karpathy, cifar
    rows: pd.DataFrame  # key, path (an image file) or image (its bytes), captions (list of str), class (str)
    classes: list[str] | None  # the classes zero-shot chooses among (None: a captions-only set)

    def to_ray(self, limit: int | None = None) -> ray.data.Dataset:
        rows = self.rows.head(limit) if limit else self.rows
        batches = max(1, min(64, len(rows) // 256))
        return ray.data.from_pandas(rows).repartition(batches).map_batches(_eval_rows, batch_format="pandas")


def _eval_rows(batch: pd.DataFrame) -> pd.DataFrame:
    from upath import UPath

    images = batch["image"] if "image" in batch else [UPath(p).read_bytes() for p in batch["path"]]
    return pd.DataFrame({"key": batch["key"].astype(str), "image": list(images),
                         "captions": [json.dumps(list(c)) for c in batch["captions"]],
                         f"label_{CLASS_LABEL}": batch["class"].fillna("").astype(str)})


def detect(path: str | os.PathLike, split: str) -> StandardDataset | None:
    """The dataset at `path` when it is in one of the layouts above, else None."""
    from components.eval.datasets import cifar, image_folder, karpathy

    for layout in (karpathy, cifar, image_folder):
        if layout.matches(path, split):
            return layout.read(path, split)
    return None
