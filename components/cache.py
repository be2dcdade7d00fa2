"""Computed-once caches (teacher targets, image embeddings, a pretrained decoder): a directory per content key with
a marker file, written last, recording what it holds. On disk the directory is written under a temporary name and
renamed when complete; in an object store (no rename) the marker alone says it is complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable

from upath import UPath

from components import storage

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


def computed_once(cache_root: str | os.PathLike, key: str, write: Callable[[UPath], dict], what: str,
                  stage: str) -> UPath:
    """cache_root/key (a local directory or an object-store location), calling write(directory) -> a summary
    (recorded in the marker) only when no complete copy exists."""
    cache_root = UPath(cache_root)
    out = cache_root / key
    if (out / DONE).is_file():
        print(f"[{stage}] {what} cached in {out}", flush=True)
        return out
    if storage.is_remote(out):
        # An object store has no rename: the marker, written last, is what makes the copy complete.
        storage.remove_tree(out)
        summary = write(out)
    else:
        partial = cache_root / f"{key}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        summary = write(partial)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    storage.write_text(out / DONE, json.dumps({**summary, "what": what}) + "\n")
    print(f"[{stage}] {what} written to {out} ({', '.join(f'{k} {v}' for k, v in summary.items())})", flush=True)
    return out


def cached_parquet(cache_root: str | os.PathLike, key: str, write: Callable[[UPath], int], what: str,
                   stage: str) -> UPath:
    """computed_once for Parquet files: write(partial_dir) -> rows written."""
    return computed_once(cache_root, key, lambda partial: {"rows": write(partial)}, what, stage)
