"""Embeddings on disk, appended batch by batch and read back block by block, so evaluation memory does not
grow with the dataset.

A store is a directory of chunks, one per appended batch: `chunk_00000.f0.npy`, `chunk_00000.f1.npy` ... for
the feature tensors of the batch (a model's `Features`: CLIP one [n, D] array, FILIP token arrays and a mask),
`chunk_00000.emb.npy` for the global embedding, and `chunk_00000.meta.parquet` for the rows' metadata (labels,
captions). Chunks are read memory-mapped; `rows(start, stop)` concatenates the few chunks a block spans.
"""

from __future__ import annotations

import bisect
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INDEX = "store.json"


class EmbeddingStore:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        self.sizes: list[int] = json.loads(index.read_text())["sizes"] if index.is_file() else []
        self._starts = np.cumsum([0, *self.sizes]).tolist()

    @classmethod
    def create(cls, directory: str | Path) -> EmbeddingStore:
        directory = Path(directory)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        return cls(directory)

    def __len__(self) -> int:
        return self._starts[-1]

    def append(self, features: tuple[np.ndarray, ...], embedding: np.ndarray, meta: dict[str, list]) -> None:
        n = len(embedding)
        if any(len(f) != n for f in features) or any(len(v) != n for v in meta.values()):
            raise ValueError("features, embedding and metadata of a chunk must have the same number of rows")
        chunk = len(self.sizes)
        for i, array in enumerate(features):
            np.save(self._path(chunk, f"f{i}.npy"), np.ascontiguousarray(array))
        np.save(self._path(chunk, "emb.npy"), np.ascontiguousarray(embedding))
        pq.write_table(pa.table(meta), self._path(chunk, "meta.parquet"))
        self.sizes.append(n)
        self._starts.append(self._starts[-1] + n)
        # The index is written last: a store read back is always whole chunks.
        (self.directory / INDEX).write_text(json.dumps({"sizes": self.sizes, "features": len(features)}))

    def _path(self, chunk: int, suffix: str) -> Path:
        return self.directory / f"chunk_{chunk:05d}.{suffix}"

    @property
    def feature_count(self) -> int:
        return json.loads((self.directory / INDEX).read_text())["features"]

    def _chunks(self, start: int, stop: int) -> Iterator[tuple[int, slice]]:
        """(chunk, slice within it) covering rows [start, stop)."""
        chunk = bisect.bisect_right(self._starts, start) - 1
        while start < stop:
            first = self._starts[chunk]
            end = min(stop, first + self.sizes[chunk])
            yield chunk, slice(start - first, end - first)
            start, chunk = end, chunk + 1

    def _read(self, suffix: str, start: int, stop: int) -> np.ndarray:
        parts = [np.load(self._path(c, suffix), mmap_mode="r")[s] for c, s in self._chunks(start, stop)]
        return np.concatenate(parts) if len(parts) != 1 else np.array(parts[0])

    def features(self, start: int, stop: int) -> tuple[np.ndarray, ...]:
        return tuple(self._read(f"f{i}.npy", start, stop) for i in range(self.feature_count))

    def embeddings(self, start: int, stop: int) -> np.ndarray:
        return self._read("emb.npy", start, stop)

    def meta_column(self, name: str) -> list:
        """One metadata column for every row (labels, captions: small next to the features)."""
        out: list = []
        for chunk in range(len(self.sizes)):
            out.extend(pq.read_table(self._path(chunk, "meta.parquet"), columns=[name]).column(name).to_pylist())
        return out

    def blocks(self, block: int) -> Iterator[tuple[int, int]]:
        for start in range(0, len(self), block):
            yield start, min(len(self), start + block)
