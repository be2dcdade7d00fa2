"""Batch inference with Ray Data: model actors turn image rows or texts into features, streamed to an
EmbeddingStore on disk by the driver (memory stays one batch wide, whatever the dataset size).

The actors load the model once each (from an export in a bucket, one packed into Ray's object store, or a
local directory, which on a cluster must be on shared storage), run on a GPU when one is asked for, and pass
every other column through, so each stored row keeps its own metadata whatever order the batches arrive in.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from components import storage
from components.eval.store import EmbeddingStore

SIDES = ("image", "text")


@dataclass(frozen=True)
class ShippedExport:
    """An export directory packed into Ray's object store, so that workers on any node load it without a shared
    disk: each unpacks its own copy. For a model the driver downloaded into its scratch (evaluate.py)."""

    files: ray.ObjectRef  # {path relative to the export: bytes}
    source: str  # the model URI, for messages

    @staticmethod
    def files_of(directory: Path) -> dict[str, bytes]:
        return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}

    @classmethod
    def pack(cls, directory: Path, source: str) -> ShippedExport:
        return cls(ray.put(cls.files_of(directory)), source)

    @contextlib.contextmanager
    def local_copy(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="clipforge-shipped-") as scratch:
            root = Path(scratch)
            for name, data in ray.get(self.files).items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
            yield root

    def __str__(self) -> str:
        return self.source


ModelSource = str | Path | ShippedExport


def load_export(model_dir: ModelSource):
    """(model in eval mode, its text processor) from an export: a local directory, one in an object store, or one
    shipped through Ray's object store (what a ResolvedModel gives its workers: each reads it on its own node)."""
    from components.eval.runner import export_in
    from components.models.factory import load_model_and_text

    copy = model_dir.local_copy() if isinstance(model_dir, ShippedExport) else storage.local_copy(model_dir)
    with copy as local:
        model, text = load_model_and_text(export_in(local, str(model_dir)))
    return model.eval(), text


class Embedder:
    """map_batches callable (an actor): `image` bytes or `text` strings -> f0.., emb + the other columns."""

    def __init__(self, model_dir: ModelSource, side: str, device: str = "cpu"):
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise
        self.model, self.text = load_export(model_dir)
        self.model.to(device)
        self.side, self.device = side, device

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from components.models.inference import image_tensor, text_inputs

        model = self.model
        if self.side == "image":
            features = model.encode_image(image_tensor(model, list(batch["image"])).to(self.device))
            embedding = model.image_embedding(features)
        else:
            inputs = text_inputs(model, self.text, [str(t) for t in batch["text"]])
            features = model.encode_text({k: v.to(self.device) for k, v in inputs.items()})
            embedding = model.text_embedding(features)
        out = {f"f{i}": f.float().cpu().numpy() for i, f in enumerate(features)}
        out["emb"] = embedding.float().cpu().numpy()
        out.update({k: v for k, v in batch.items() if k != "image"})
        return out


def _embedded_batches(dataset: ray.data.Dataset, model_dir: ModelSource, side: str, total: int | None, *,
                      batch_size: int = 128, actors: int = 1, use_gpu: bool = False, progress: bool = True):
    """(features, embedding, metadata columns) per output batch of Embedder actors over `dataset`."""
    embedded = dataset.map_batches(
        Embedder, fn_constructor_kwargs={"model_dir": model_dir, "side": side,
                                         "device": "cuda" if use_gpu else "cpu"},
        batch_size=batch_size, concurrency=actors, num_gpus=1 if use_gpu else 0, batch_format="numpy")
    with tqdm(total=total, desc=f"embed {side}s", unit=side, disable=not progress, mininterval=2) as bar:
        for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
            feature_names = sorted((k for k in batch if k.startswith("f") and k[1:].isdigit()), key=lambda k: int(k[1:]))
            meta = {k: [_plain(v) for v in values] for k, values in batch.items()
                    if k != "emb" and k not in feature_names}
            yield tuple(batch[k] for k in feature_names), batch["emb"], meta
            bar.update(len(batch["emb"]))


def embed_to_store(dataset: ray.data.Dataset, model_dir: ModelSource, side: str, store_dir: str | Path,
                   total: int | None = None, **settings) -> EmbeddingStore:
    """Run Embedder actors over `dataset` and append every output batch to a new store at `store_dir`."""
    store = EmbeddingStore.create(store_dir)
    for features, embedding, meta in _embedded_batches(dataset, model_dir, side, total, **settings):
        store.append(features, embedding, meta)
    return store


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def embed_text_sets(text_sets: dict[str, list[str]], model_dir: ModelSource, store_root: str | Path,
                    **settings) -> dict[str, EmbeddingStore]:
    """Several named lists of texts (captions, each language's captions) embedded in ONE Ray Data pass
    (one actor pool, one streaming execution), each into its own store with a `text_index` column."""
    items = [{"text": text, "text_index": index, "text_set": name}
             for name, texts in text_sets.items() for index, text in enumerate(texts)]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // 4096))
    stores = {name: EmbeddingStore.create(Path(store_root) / f"texts_{name}") for name in text_sets}
    for batch in _embedded_batches(dataset, model_dir, "text", len(items), **settings):
        features, embedding, meta = batch
        sets = np.asarray(meta.pop("text_set"))
        for name in np.unique(sets):
            rows = np.flatnonzero(sets == name)
            stores[str(name)].append(tuple(f[rows] for f in features), embedding[rows],
                                     {k: [v[i] for i in rows] for k, v in meta.items()})
    return stores
