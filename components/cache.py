"""Computed-once caches (teacher targets, image embeddings, a pretrained decoder): a directory per content key,
written under a temporary name and renamed when complete, with a marker file recording what it holds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from upath import UPath

DONE = "_cache.json"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-1 of a file, local or in an object store."""
    digest = hashlib.sha1()
    with UPath(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_key(*parts: str) -> str:
    return hashlib.sha1("-".join(parts).encode()).hexdigest()[:16]


def computed_once(cache_root: Path, key: str, write: Callable[[Path], dict], what: str, stage: str) -> Path:
    """cache_root/key, calling write(partial_dir) -> a summary (recorded in the marker) only when no complete
    copy exists."""
    out = cache_root / key
    if (out / DONE).is_file():
        print(f"[{stage}] {what} cached in {out}", flush=True)
        return out
    partial = cache_root / f"{key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    summary = write(partial)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    (out / DONE).write_text(json.dumps({**summary, "what": what}) + "\n")
    print(f"[{stage}] {what} written to {out} ({', '.join(f'{k} {v}' for k, v in summary.items())})", flush=True)
    return out


def cached_parquet(cache_root: Path, key: str, write: Callable[[Path], int], what: str, stage: str) -> Path:
    """computed_once for Parquet files: write(partial_dir) -> rows written."""
    return computed_once(cache_root, key, lambda partial: {"rows": write(partial)}, what, stage)
