"""CIFAR-10 and CIFAR-100 as distributed: `cifar-10-batches-py/` (test_batch, data_batch_1..5, batches.meta) and
`cifar-100-python/` (test, train, meta), Python pickles of 32x32 RGB rows. `path` is that folder or its parent;
`data_split` test or train. The pickles are read by an unpickler that builds only numpy arrays and plain
containers: a file that asks for anything else is refused rather than run."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pandas as pd
from upath import UPath

from components.eval.datasets import StandardDataset

LAYOUTS = {  # folder -> (split files, meta file, labels key, names key)
    "cifar-10-batches-py": ({"test": ["test_batch"], "train": [f"data_batch_{i}" for i in range(1, 6)]},
                            "batches.meta", b"labels", b"label_names"),
    "cifar-100-python": ({"test": ["test"], "train": ["train"]}, "meta", b"fine_labels", b"fine_label_names"),
}
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused: the file asks for {module}.{name}")
        return super().find_class(module, name)


def load(path: UPath) -> dict:
    try:
        return _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: {error}") from None


def _folder(path: str | os.PathLike) -> tuple[UPath, tuple] | None:
    path = UPath(path)
    for name, layout in LAYOUTS.items():
        for folder in (path, path / name):
            if folder.name == name and (folder / layout[1]).is_file():
                return folder, layout
    return None


def matches(path: str | os.PathLike, split: str) -> bool:
    return _folder(path) is not None


def read(path: str | os.PathLike, split: str) -> StandardDataset:
    from PIL import Image

    folder, (splits, meta, labels_key, names_key) = _folder(path)
    if split not in splits:
        raise ValueError(f"{folder}: data_split must be one of {', '.join(splits)}, got {split!r}")
    names = [n.decode() for n in load(folder / meta)[names_key]]
    rows = []
    for file in splits[split]:
        batch = load(folder / file)
        pixels = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for i, (image, label) in enumerate(zip(pixels, batch[labels_key])):
            encoded = io.BytesIO()
            Image.fromarray(image).save(encoded, "PNG")
            rows.append({"key": f"{file}/{i}", "image": encoded.getvalue(), "captions": [],
                         "class": names[int(label)].replace("_", " ")})
    return StandardDataset("cifar", pd.DataFrame(rows), [n.replace("_", " ") for n in names])
