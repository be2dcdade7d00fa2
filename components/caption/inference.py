"""Batch captioning (pipelines/caption.py): a registered captioner over shards or a folder of images, by Ray Data
actors that each load the pyfunc model once.

Every input row comes out, in input order within each block: `key` (the sample key, or the image's path relative
to the folder), `caption` (null when the image could not be captioned), `error` (why not, else null) and
`reference` (the shard's own caption, "" for a folder).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import PurePosixPath

import pandas as pd
import ray
from upath import UPath

from components import storage
from components.eval.dataset import EvalFields, read_eval_rows

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
OUTPUT_FORMATS = ("parquet", "jsonl")


def read_images(data: str | os.PathLike, caption_field: str = "txt") -> ray.data.Dataset:
    """Rows key, image (bytes), reference from WebDataset/Parquet shards (a directory or one file) or from a
    folder of image files (searched recursively), local or in an object store."""
    data = UPath(data)
    if data.is_dir() and not any(data.glob("*.tar")) and not any(data.glob("*.parquet")):
        images = sorted((p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=str)
        if not images:
            raise FileNotFoundError(f"no WebDataset/Parquet shards and no images ({' '.join(IMAGE_SUFFIXES)}) in "
                                    f"{data}")
        files, filesystem = storage.arrow_paths(images)
        (root,), _ = storage.arrow_paths([data])
        return ray.data.read_binary_files(files, include_paths=True, filesystem=filesystem).map_batches(
            _folder_rows, fn_kwargs={"root": root}, batch_format="pandas")
    return read_eval_rows(data, EvalFields(caption=caption_field)).map_batches(_shard_rows, batch_format="pandas")


def _folder_rows(batch: pd.DataFrame, root: str) -> pd.DataFrame:
    keys = [str(PurePosixPath(p).relative_to(root)) for p in batch["path"]]
    return pd.DataFrame({"key": keys, "image": list(batch["bytes"]), "reference": [""] * len(keys)})


def _shard_rows(batch: pd.DataFrame) -> pd.DataFrame:
    references = [(json.loads(c) or [""])[0] for c in batch["captions"]]
    return pd.DataFrame({"key": batch["key"], "image": list(batch["image"]), "reference": references})


def decode_error(image: bytes) -> str | None:
    """None when Pillow reads the whole image, else the reason in one line."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image)) as opened:
            opened.load()
    except UnidentifiedImageError:
        return "cannot decode image: not an image format Pillow reads"
    except Exception as error:  # Pillow raises many types for truncated or corrupt data
        return f"cannot decode image: {type(error).__name__}: {error}".splitlines()[0]
    return None


class Captioner:
    """Ray Data actor: the pyfunc captioner (image bytes -> caption), with decoding settings overridden per run.
    Each actor loads the model from the tracking server (on a cluster, every node reads it there)."""

    def __init__(self, model_uri: str, tracking_uri: str, settings: dict):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        self.model, self.settings = mlflow.pyfunc.load_model(model_uri), settings

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        errors = [decode_error(image) for image in batch["image"]]
        readable = [i for i, error in enumerate(errors) if error is None]
        captions: list[str | None] = [None] * len(batch)
        if readable:
            images = pd.DataFrame({"image": [batch["image"].iloc[i] for i in readable]})
            predicted = self.model.predict(images, params=self.settings or None)["caption"]
            for row, caption in zip(readable, predicted):
                captions[row] = caption
        return pd.DataFrame({"key": batch["key"], "caption": captions, "error": errors,
                             "reference": batch["reference"]})


def caption_dataset(rows: ray.data.Dataset, model_uri: str, tracking_uri: str, settings: dict, *, batch_size: int,
                    actors: int, use_gpu: bool) -> ray.data.Dataset:
    return rows.map_batches(Captioner, fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": tracking_uri,
                                                              "settings": settings},
                            batch_size=batch_size, concurrency=actors, num_gpus=1 if use_gpu else 0,
                            batch_format="pandas")


def write_captions(captioned: ray.data.Dataset, output: UPath, output_format: str) -> None:
    """A directory (local or in an object store) of Parquet or JSON Lines files, one per block: the rows stream,
    never gathered; output_format: one of OUTPUT_FORMATS (the pipeline checks it before any work)."""
    (target,), filesystem = storage.arrow_paths([UPath(output)])
    if output_format == "parquet":
        captioned.write_parquet(target, filesystem=filesystem)
    else:
        captioned.write_json(target, filesystem=filesystem, lines=True, force_ascii=False)


def read_captions(output: UPath, output_format: str, columns: list[str] | None = None) -> ray.data.Dataset:
    (source,), filesystem = storage.arrow_paths([UPath(output)])
    if output_format == "parquet":
        return ray.data.read_parquet(source, filesystem=filesystem, columns=columns)
    rows = ray.data.read_json(source, filesystem=filesystem)  # pyarrow's reader: newline-delimited JSON
    return rows.select_columns(columns) if columns else rows


def outcome_counts(output: UPath, output_format: str) -> dict[str, int]:
    """rows written and rows that failed (from the written files: the accounting the user can check)."""
    counts = read_captions(output, output_format, ["error"]).map_batches(_count_batch, batch_format="pandas")
    totals = counts.sum(["rows", "failed"]) if counts.count() else {"sum(rows)": 0, "sum(failed)": 0}
    return {"rows": int(totals["sum(rows)"]), "failed": int(totals["sum(failed)"])}


def _count_batch(batch: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"rows": [len(batch)], "failed": [int(batch["error"].notna().sum())]})
