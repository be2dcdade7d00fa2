"""Ray Data from ingest shards to trainer batches: read, select, decode + augment, and the captions through the
model's text processor (components/models/text.py: token ids, or CLIPPO's renderings).

Everything here runs on Ray Data's CPU workers (on any node), streaming; trainers receive ready uint8
image arrays and token ids through `get_dataset_shard(...).iter_torch_batches`, and normalise on their device.
"""

from __future__ import annotations

import functools
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pa_compute
import ray
from PIL import Image
from upath import UPath

from components import storage
from components.data.shard_sets import shard_files
from components.models.text import TextProcessor


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.6, 1.0)  # random resized crop: area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False  # off by default: flipping a text-bearing image (a sign, a flag) changes its caption's truth


@dataclass(frozen=True)
class TextConfig:
    processor: TextProcessor  # the model's: model.text_processor(tokenizer_dir)
    caption_column: str = "caption"
    # When set, each example's caption is drawn uniformly from these columns' non-empty values (AltCLIP stage 2:
    # one language per example); caption_column is the fallback.
    caption_choices: tuple[str, ...] = ()
    # CLIPPO text/text pairs: with this probability the "image" is a rendered translation of the caption.
    text_pair_fraction: float = 0.0
    pair_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchSpec:
    image_size: int
    text: TextConfig
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)  # None: centre resize (evaluation)
    seed: int = 0


def read_pairs(shards: str | os.PathLike | list[UPath], where: dict[str, Any] | None = None) -> ray.data.Dataset:
    """Image bytes, caption and metadata of every sample of a shard set (components/data/shard_sets.py; or of a
    list of shard files, read in that order), optionally only rows whose json fields match `where`; the shards
    may be local or in an object store."""
    files, filesystem = storage.arrow_paths(shard_files(shards))
    dataset = ray.data.read_webdataset(files, decoder=None, filesystem=filesystem, override_num_blocks=None)
    return dataset.map_batches(_unpack, fn_kwargs={"where": dict(where or {})}, batch_format="pandas")


def matching_share(shard_dir: str | os.PathLike, where: dict[str, Any] | None, sample_shards: int = 8) -> float:
    """The share of the shards' rows whose metadata match `where`, counted in the Parquet companions (only the
    `where` columns) of the first `sample_shards` shards; 1.0 without a filter or when those columns are missing.
    A run sizes its passes over the data with it: reading every shard's metadata would cost a pass of its own."""
    if not where:
        return 1.0
    matched = total = 0
    for tar in shard_files(shard_dir)[:sample_shards]:
        try:
            table = storage.read_parquet(tar.with_suffix(".parquet"), columns=list(where))
        except (FileNotFoundError, KeyError, ValueError):  # no companion, or a `where` key it lacks
            return 1.0
        columns = {name: table.column(name).to_pylist() for name in where}
        total += table.num_rows
        matched += sum(all(columns[k][i] == v for k, v in where.items()) for i in range(table.num_rows))
    return matched / total if total else 1.0


def _unpack(batch, where: dict[str, Any]):
    import pandas as pd

    image_column = next(c for c in ("jpg", "png", "webp", "jpeg") if c in batch.columns)
    meta = [json.loads(m) for m in batch["json"]] if "json" in batch.columns else [{} for _ in range(len(batch))]
    if "txt" in batch.columns:  # shards made elsewhere may carry the caption only as {key}.txt
        for fields, text in zip(meta, batch["txt"]):
            fields.setdefault("caption", text.decode("utf-8").strip() if isinstance(text, bytes) else text)
    keep = [all(m.get(k) == v for k, v in where.items()) for m in meta]
    rows = {"key": batch["__key__"], "image": batch[image_column], "meta": [json.dumps(m) for m in meta]}
    frame = pd.DataFrame(rows)[keep]
    return frame.reset_index(drop=True)


class Preprocess:
    """map_batches callable: image bytes -> uint8 [B, H, W, 3]; caption -> the text processor's arrays."""

    def __init__(self, spec: BatchSpec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed + _worker_salt())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.spec
        metas = [json.loads(m) for m in batch["meta"]]
        captions = [self._caption(m) for m in metas]
        pixels = np.stack([self._image(b) for b in batch["image"]])
        for i, translation in self._text_pairs(metas, captions).items():
            pixels[i] = spec.text.processor.as_image(translation, spec.image_size)
        return {"pixels": pixels, **spec.text.processor(captions)}

    def _caption(self, meta: dict) -> str:
        options = [meta[c] for c in self.spec.text.caption_choices if meta.get(c)]
        if options:
            return options[self.rng.integers(len(options))]
        return meta.get(self.spec.text.caption_column) or ""

    def _image(self, data: bytes) -> np.ndarray:
        size = self.spec.image_size
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            augment = self.spec.augment
            if augment is None:
                return np.asarray(image.resize((size, size), Image.BICUBIC))
            box = random_resized_box(image.width, image.height, augment.scale, augment.ratio, self.rng)
            image = image.resize((size, size), Image.BICUBIC, box=box)
            if augment.hflip and self.rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            return np.asarray(image)

    def _text_pairs(self, metas: list[dict], captions: list[str]) -> dict[int, str]:
        """{example: a translation of its caption} for the examples drawn as text/text pairs; the caption itself
        (its own language's column) is no translation."""
        text = self.spec.text
        if text.text_pair_fraction <= 0 or not text.pair_columns:
            return {}
        pairs = {}
        for i, meta in enumerate(metas):
            if self.rng.random() < text.text_pair_fraction:
                options = [meta[c] for c in text.pair_columns if meta.get(c) and meta[c] != captions[i]]
                if options:
                    pairs[i] = options[self.rng.integers(len(options))]
        return pairs


def random_resized_box(width: int, height: int, scale, ratio, rng: np.random.Generator) -> tuple[float, ...]:
    """torchvision's RandomResizedCrop box sampling (no torchvision dependency)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w, h = np.sqrt(target * aspect), np.sqrt(target / aspect)
        if w <= width and h <= height:
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return (x, y, x + w, y + h)
    return (0, 0, width, height)


def _worker_salt() -> int:
    # Each Ray worker process draws its own augmentation stream.
    import os

    return os.getpid()


@functools.lru_cache(maxsize=4)
def _preprocessor(spec: BatchSpec) -> Preprocess:
    return Preprocess(spec)


def preprocess_batch(batch: dict[str, np.ndarray], spec: BatchSpec) -> dict[str, np.ndarray]:
    """Preprocess as a plain Ray task: one Preprocess (tokenizer, RNG) per worker process, kept between tasks
    and epochs. Ray reuses its task workers, so a new epoch starts at once; an actor pool would be started
    anew for every pass over the data."""
    return _preprocessor(spec)(batch)


def pass_order(paths: list[UPath], passes: int, seed: int) -> list[UPath]:
    """Every path once per pass, each pass in its own order drawn from `seed`. A shuffle of the repeated list
    instead lets one file come round several times in a row: on a corpus of few shards, whose rows are in
    category order, the model then trains on one part of it for dozens of steps (CLIPPO's held-out mean rank
    after 200 steps: 81-92 of 194 that way in three runs, 76-86 with per-pass orders)."""
    rng = np.random.default_rng(seed)
    return [paths[i] for _ in range(max(1, passes)) for i in rng.permutation(len(paths))]


def training_dataset(shard_dir: str | Path, spec: BatchSpec, where: dict[str, Any] | None = None,
                     preprocess_workers: int | None = None, passes: int = 1) -> ray.data.Dataset:
    """The dataset handed to TorchTrainer: shard order randomised, preprocessed by Ray tasks on any node.

    passes > 1 chains that many passes into one stream, for runs longer than the dataset: each new pass over a
    Ray Dataset starts a new execution, which costs seconds, and on a small dataset those restarts would
    dominate. Large datasets need 1. The passes are one read of the shard files in `pass_order`, so rows stream
    from the first file read: randomize_block_order would hold each pass back until all of it had been read,
    and a union of per-pass reads makes Ray Data reserve resources for every branch."""
    pairs = read_pairs(pass_order(shard_files(shard_dir), passes, spec.seed), where)
    return pairs.map_batches(preprocess_batch, fn_kwargs={"spec": spec}, batch_size=64, num_cpus=0.5,
                             concurrency=preprocess_workers)


# -- AltCLIP stage 1: parallel text with the teacher's targets ---------------------------------------------------
@functools.lru_cache(maxsize=4)
def _worker_copy(text: TextProcessor) -> TextProcessor:
    # One processor per setting and worker process: a task's own unpickled copy would read the tokenizer again.
    return text


def tokenize_parallel(batch: dict[str, np.ndarray], text: TextProcessor) -> dict[str, np.ndarray]:
    """tgt -> the student's text arrays; target (the teacher's features of src) -> float32 [B, D]."""
    return {**_worker_copy(text)([str(t) for t in batch["tgt"]]),
            "target": np.stack(batch["target"]).astype(np.float32)}


def cached_rows(directory: str | Path, columns: list[str], split: str | None = None) -> ray.data.Dataset:
    """One pass over a cache of Parquet files (shuffled when written), optionally only the rows whose `split`
    column equals `split`. Longer runs start the next pass when this one ends (train_worker's batch stream);
    a union of per-pass reads instead makes Ray Data reserve resources per branch, which on a small cluster
    left none to run them (a hang seen here with 5 passes)."""
    rows = storage.ray_read_parquet(directory).select_columns(columns)
    return rows.filter(expr=f"split == '{split}'") if split is not None else rows


def split_rows(directory: str | Path, split: str) -> int:
    """How many rows of a Parquet cache have `split` in their split column (read alone)."""
    table = storage.read_parquet(directory, columns=["split"])
    return int(pa_compute.sum(pa_compute.equal(table.column("split"), split)).as_py() or 0)


def parallel_text_dataset(targets_dir: str | Path, text: TextProcessor, split: str | None = "train",
                          in_memory: bool = False) -> ray.data.Dataset:
    """Stage 1's training stream: the cached (src, tgt, lang, split, target) Parquet rows of `split` (shuffled
    when cached), tgt tokenised by Ray tasks (as training_dataset does for images). Streamed from Parquet, or,
    `in_memory`, tokenised once and held in Ray's object store: a pass started from Parquet costs seconds (a new
    execution, file listing, tokenizer loading), which a small set pays every few dozen steps."""
    rows = cached_rows(targets_dir, ["tgt", "split", "target"], split)
    tokens = rows.map_batches(tokenize_parallel, fn_kwargs={"text": text}, batch_size=256, num_cpus=0.5,
                              batch_format="numpy")
    return tokens.materialize() if in_memory else tokens
