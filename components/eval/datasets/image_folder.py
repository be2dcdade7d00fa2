"""ImageNet-style class folders: `root[/<split>]/<class id>/*.JPEG|jpg|png`, with an optional class-names file
`root/classnames.txt` mapping folder names to names (`n01440764 tench`, one per line; a folder without a line keeps
its name). Classes are the folders, in sorted order, as torchvision's ImageFolder numbers them."""

from __future__ import annotations

import os

import pandas as pd
from upath import UPath

from components.eval.datasets import StandardDataset

SUFFIXES = (".jpeg", ".jpg", ".png", ".webp")


def _root(path: str | os.PathLike, split: str) -> UPath:
    root = UPath(path)
    return root / split if (root / split).is_dir() else root


def _class_folders(root: UPath) -> list[UPath]:
    return sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name) if root.is_dir() else []


def matches(path: str | os.PathLike, split: str) -> bool:
    folders = _class_folders(_root(path, split))
    return bool(folders) and any(f.suffix.lower() in SUFFIXES for f in folders[0].iterdir())


def read(path: str | os.PathLike, split: str) -> StandardDataset:
    root = _root(path, split)
    names_file = UPath(path) / "classnames.txt"
    names = {}
    if names_file.is_file():
        for line in names_file.read_text().splitlines():
            folder, _, name = line.strip().partition(" ")
            if folder:
                names[folder] = name.strip() or folder
    rows, classes = [], []
    for folder in _class_folders(root):
        classes.append(names.get(folder.name, folder.name))
        for image in sorted(folder.iterdir(), key=lambda p: p.name):
            if image.suffix.lower() in SUFFIXES:
                rows.append({"key": f"{folder.name}/{image.stem}", "path": str(image), "captions": [],
                             "class": classes[-1]})
    return StandardDataset("image_folder", pd.DataFrame(rows), classes)
