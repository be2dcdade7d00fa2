"""CLIP_benchmark's WebDataset layout, in which most of its datasets are distributed:

    root/{split}/nshards.txt, root/{split}/0.tar ...    samples: webp|png|jpg|jpeg + cls (class index) or txt
    root/classnames.txt                                  one class name per line, line i for cls i
    root/zeroshot_classification_templates.txt           optional, one template per line ({c}: the class)
    root/dataset_type.txt                                optional: classification (default) or retrieval

A retrieval dataset's `txt` holds an image's captions one per line. `python pipelines/evaluate.py
data=<root>` reads such a folder as CLIP_benchmark does (`data_split`, default test): zero-shot classification
over every class of classnames.txt with the dataset's templates, or retrieval over every caption.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from upath import UPath

from components.eval.templates import as_ours


@dataclass(frozen=True)
class BenchmarkDataset:
    shards: UPath  # the split's folder
    kind: str  # "classification" or "retrieval"
    classes: list[str] | None  # classnames.txt
    templates: list[str] | None  # zeroshot_classification_templates.txt, `{c}` read as `{}`


def is_benchmark_layout(root: str | os.PathLike, split: str) -> bool:
    return (UPath(root) / split / "nshards.txt").is_file()


def read_layout(root: str | os.PathLike, split: str) -> BenchmarkDataset:
    root = UPath(root)

    def lines(name: str) -> list[str] | None:
        path = root / name
        return [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else None

    kind = (lines("dataset_type.txt") or ["classification"])[0].lower()
    if kind not in ("classification", "retrieval"):
        raise ValueError(f"{root}/dataset_type.txt: {kind!r} datasets are not supported (classification, retrieval)")
    shards = int((root / split / "nshards.txt").read_text().strip())
    missing = [i for i in range(shards) if not (root / split / f"{i}.tar").is_file()]
    if missing:
        raise FileNotFoundError(f"{root}/{split}: {len(missing)} of the {shards} shards nshards.txt counts are "
                                f"missing (first: {missing[0]}.tar)")
    templates = lines("zeroshot_classification_templates.txt")
    return BenchmarkDataset(root / split, kind, lines("classnames.txt"),
                            [as_ours(t) for t in templates] if templates else None)
