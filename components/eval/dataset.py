"""Evaluation data: any WebDataset shards or Parquet files, with the field names given in config.

A *field* names either a column (WebDataset: `txt`, `cls`, ...; Parquet: any column) or a key of the sample's
JSON metadata (`{key}.json`). A caption field may hold a list: several captions for one image; a row without it
takes its WebDataset `txt` member, the caption by that format's convention. Rows come out
as: `key` (the sample key, else a digest of the image), `image` (encoded bytes), `captions` (a JSON list of
strings), one column per named label `label_<name>`
(string or ""), and one per caption language `lang_<code>` (string or "").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import ray
from upath import UPath

from components import storage
from components.data.shard_sets import is_pattern, shard_files

IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg", "image")


@dataclass(frozen=True)
class EvalFields:
    caption: str = "txt"
    labels: dict[str, str] = field(default_factory=dict)  # label name (what tasks ask for) -> field
    languages: dict[str, str] = field(default_factory=dict)  # language code -> caption field
    image: tuple[str, ...] = IMAGE_COLUMNS  # the first of these present is the image
    class_names: dict[str, list[str]] = field(default_factory=dict)  # label name -> names of its integer values
    caption_lines: bool = False  # a caption holds several, one per line (CLIP_benchmark's retrieval sets)


def data_files(path: str | os.PathLike) -> tuple[str, list[UPath]]:
    """("webdataset" | "parquet", files) for a shard directory, a brace pattern of shards or a single file, local
    or in an object store."""
    if is_pattern(path):
        return "webdataset", shard_files(path)
    path = UPath(path)
    if path.is_file():
        kind = "parquet" if path.suffix == ".parquet" else "webdataset"
        return kind, [path]
    if not path.is_dir():
        raise FileNotFoundError(f"evaluation data {path} does not exist (give a shard directory or file)")
    tars = sorted(path.glob("*.tar"), key=str)
    if tars:
        return "webdataset", tars
    parquets = sorted(path.glob("*.parquet"), key=str)
    if parquets:
        return "parquet", parquets
    raise FileNotFoundError(f"no WebDataset shards (*.tar) or Parquet files in {path}")


def read_eval_rows(path: str | os.PathLike, fields: EvalFields, where: dict[str, Any] | None = None,
                   limit: int | None = None) -> ray.data.Dataset:
    """A Ray Dataset of evaluation rows (see the module docstring), filtered by `where` (field -> value). `path`
    may be a standard dataset read by components/eval/datasets (its rows are evaluation rows already)."""
    from components.eval.datasets import StandardDataset

    if isinstance(path, StandardDataset):
        if where:
            raise ValueError(f"where= does not apply to a {path.name} dataset: choose its split with data_split")
        return path.to_ray(limit)
    kind, files = data_files(path)
    files, filesystem = storage.arrow_paths(files)
    if kind == "webdataset":
        dataset = ray.data.read_webdataset(files, decoder=None, filesystem=filesystem)
    else:
        dataset = ray.data.read_parquet(files, filesystem=filesystem)
    if limit:
        dataset = dataset.limit(int(limit))
    return dataset.map_batches(_select, fn_kwargs={"fields": fields, "where": dict(where or {})},
                               batch_format="pandas")


def _lookup(row: dict, meta: dict, name: str) -> Any:
    return row[name] if name in row else meta.get(name)


def _select(batch, fields: EvalFields, where: dict[str, Any]):
    import pandas as pd

    image_column = next((c for c in fields.image if c in batch.columns), None)
    if image_column is None:
        raise ValueError(f"no image column among {list(fields.image)} (columns: {sorted(batch.columns)}): "
                         "set fields.image")
    out: dict[str, list] = {"key": [], "image": [], "captions": []}
    for name in fields.labels:
        out[f"label_{name}"] = []
    for code in fields.languages:
        out[f"lang_{code}"] = []
    for row in batch.to_dict("records"):
        meta = row.get("json")
        meta = json.loads(meta) if isinstance(meta, (bytes, str)) else (meta or {})
        if any(_lookup(row, meta, k) != v for k, v in where.items()):
            continue
        captions = _text(_lookup(row, meta, fields.caption))
        if captions is None and row.get("txt") is not None:  # WebDataset's caption member, whatever fields say
            captions = _text(row["txt"])
        if fields.caption_lines and isinstance(captions, str):
            captions = [line.strip() for line in captions.splitlines() if line.strip()]
        out["key"].append(str(row.get("__key__") or row.get("key") or _digest(row[image_column])))
        out["image"].append(row[image_column])
        out["captions"].append(json.dumps(captions if isinstance(captions, list) else [captions] if captions else []))
        for name, source in fields.labels.items():
            label = _lookup(row, meta, source)
            label = "" if label is None else str(_text(label))
            names = fields.class_names.get(name)
            out[f"label_{name}"].append(names[int(label)] if names and label.lstrip("-").isdigit() else label)
        for code, name in fields.languages.items():
            out[f"lang_{code}"].append(_text(_lookup(row, meta, name)) or "")
    return pd.DataFrame(out)


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(data).hexdigest()


def _text(value: Any) -> Any:
    """Bytes (WebDataset payloads) to str; lists of captions kept as lists of str."""
    if isinstance(value, bytes):
        return value.decode("utf-8").strip()
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays from Parquet list columns
        return _text(value.tolist())
    return value
