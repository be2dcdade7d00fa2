"""Ingest's local-image mode (`data=image_folder`): rows name image files instead of URLs. A folder of image +
`.txt` pairs is listed first (the caption beside each image, as captioning datasets and img2dataset's folder output
lay them out), or a list names the files in a path column. Only this mode reads files, and it is chosen by name: a
URL list never does (SafeDownloader refuses every scheme but http and https)."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from components import storage
from components.data.download import DownloadConfig, DownloadResult

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LOCAL_ERRORS = ("file_missing", "read_error")  # drop reasons of their own, beside the download errors
LIST_BATCH = 10_000


def write_folder_list(root: str | os.PathLike, out: UPath) -> UPath:
    """A Parquet list of every image under `root` (searched recursively, in path order): `path`, and `caption`
    from the `.txt` of the same name beside it (null without one: the caption filters then drop the row, counted).
    Written in batches, never held whole beyond the sorted paths."""
    root = UPath(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} is not a folder")
    paths = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=str)
    if not paths:
        raise FileNotFoundError(f"no images ({' '.join(IMAGE_SUFFIXES)}) under {root}")
    schema = pa.schema([("path", pa.string()), ("caption", pa.string())])
    out.parent.mkdir(parents=True, exist_ok=True)
    with storage.atomic_write(out) as file, pq.ParquetWriter(file, schema) as writer:
        for start in range(0, len(paths), LIST_BATCH):
            batch = paths[start:start + LIST_BATCH]
            writer.write_table(pa.table({"path": [str(p) for p in batch], "caption": [_caption(p) for p in batch]},
                                        schema=schema))
    return out


def _caption(image: UPath) -> str | None:
    text = image.with_suffix(".txt")
    return text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else None


class LocalFiles:
    """SafeDownloader's interface over image files (local, or in an object store): `submit(path)` gives a future
    DownloadResult; a missing file is `file_missing`, one over max_bytes `too_large`, an unreadable one
    `read_error`."""

    def __init__(self, config: DownloadConfig):
        self.config = config
        self._executor = ThreadPoolExecutor(max_workers=config.thread_count, thread_name_prefix="clipforge-read")

    def submit(self, path: str) -> Future[DownloadResult]:
        return self._executor.submit(self.fetch, path)

    def fetch(self, path: str) -> DownloadResult:
        def failed(error: str, detail: str) -> DownloadResult:
            return DownloadResult(path, None, error, detail, None, path)

        try:
            file = UPath(path)
            size = file.stat().st_size
            if size > self.config.max_bytes:
                return failed("too_large", f"{size} bytes > max_bytes {self.config.max_bytes}")
            return DownloadResult(path, file.read_bytes(), None, "", None, path)
        except FileNotFoundError:
            return failed("file_missing", "no such file")
        except OSError as error:
            return failed("read_error", f"{type(error).__name__}: {error}")

    def close(self) -> None:
        self._executor.shutdown(wait=True)
