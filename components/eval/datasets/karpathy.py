"""COCO and Flickr30k captions in Karpathy's split JSON (`dataset_coco.json`, `dataset_flickr30k.json`): images
[{filepath (COCO), filename, split, sentences: [{raw}]}], five captions an image, for multi-caption retrieval.
`path` is the JSON file or the folder holding it; images lie beside it at `<filepath>/<filename>`, or under
`images/` or `flickr30k-images/`."""

from __future__ import annotations

import json
import os

import pandas as pd
from upath import UPath

from components.eval.datasets import StandardDataset

NAMES = ("dataset_coco.json", "dataset_flickr30k.json", "dataset_flickr8k.json")
IMAGE_FOLDERS = ("", "images", "flickr30k-images")


def _json(path: str | os.PathLike) -> UPath | None:
    path = UPath(path)
    if path.is_file() and path.name in NAMES:
        return path
    return next((path / name for name in NAMES if (path / name).is_file()), None) if path.is_dir() else None


def matches(path: str | os.PathLike, split: str) -> bool:
    return _json(path) is not None


def read(path: str | os.PathLike, split: str) -> StandardDataset:
    source = _json(path)
    images = [image for image in json.loads(source.read_text())["images"] if image["split"] == split]
    if not images:
        raise ValueError(f"{source}: no image of split {split!r} (data_split)")
    first = images[0]
    found = [source.parent / folder / first.get("filepath", "") / first["filename"] for folder in IMAGE_FOLDERS]
    base = next((p.parent.parent if first.get("filepath") else p.parent for p in found if p.is_file()), None)
    if base is None:
        raise FileNotFoundError(f"{source}: image {first['filename']} is under none of "
                                f"{', '.join(str(p.parent) for p in found)}")
    rows = [{"key": str(image.get("cocoid", image.get("imgid", image["filename"]))),
             "path": str(base / image.get("filepath", "") / image["filename"]),
             "captions": [s["raw"].strip() for s in image["sentences"]], "class": None} for image in images]
    return StandardDataset("karpathy", pd.DataFrame(rows), None)
