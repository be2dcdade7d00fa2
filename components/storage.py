"""Where the pipelines keep shards, exports and tokenizers: a local directory or an object store, through fsspec.

A location is a `UPath` (universal_pathlib): the pathlib API over any fsspec filesystem. `s3://bucket/shards`,
`gs://...` or `az://...` go to the object store (credentials and endpoints come from the usual environment,
e.g. AWS_PROFILE / AWS_ENDPOINT_URL for S3, GOOGLE_APPLICATION_CREDENTIALS for GCS); anything else is a local
path, relative to where the user launched the pipeline. Local locations are `pathlib.Path`s too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
from upath import UPath

LOCAL_PROTOCOLS = ("", "file", "local")


def location(value: str | os.PathLike) -> UPath:
    """A config path or URL as a location; local paths relative to the launch directory (Hydra may chdir)."""
    if "://" in str(value):
        return UPath(str(value))
    from hydra.utils import to_absolute_path  # outside a Hydra app it resolves against the cwd
    return UPath(to_absolute_path(str(value)))


def is_remote(where: str | os.PathLike) -> bool:
    return UPath(where).protocol not in LOCAL_PROTOCOLS


def arrow_paths(paths: list[UPath]) -> tuple[list[str], pa_fs.FileSystem | None]:
    """Paths and filesystem for pyarrow and Ray Data readers: local paths as they are, object-store paths through
    their fsspec filesystem (so every fsspec protocol and its configuration works, not only pyarrow's own)."""
    if not paths or not is_remote(paths[0]):
        return [str(p) for p in paths], None
    return [p.path for p in paths], pa_fs.PyFileSystem(pa_fs.FSSpecHandler(paths[0].fs))


def read_parquet(where: str | os.PathLike, **options) -> pa.Table:
    """A Parquet file, or a directory of them, from any location."""
    (path,), filesystem = arrow_paths([UPath(where)])
    return pq.read_table(path, filesystem=filesystem, **options)


def parquet_rows(where: str | os.PathLike) -> int:
    (path,), filesystem = arrow_paths([UPath(where)])
    return pq.read_metadata(path, filesystem=filesystem).num_rows


def parquet_files(directory: str | os.PathLike) -> list[UPath]:
    """The Parquet files of a directory (a cache Ray Data wrote), sorted; FileNotFoundError when there are none."""
    files = sorted(UPath(directory).glob("*.parquet"), key=str)
    if not files:
        raise FileNotFoundError(f"no Parquet files in {directory}")
    return files


def ray_read_parquet(where: str | os.PathLike):
    """A Ray Dataset over a Parquet file or a directory's Parquet files, local or in an object store."""
    import ray

    files, filesystem = arrow_paths([UPath(where)] if str(where).endswith(".parquet") else parquet_files(where))
    return ray.data.read_parquet(files, filesystem=filesystem)


def ray_write_parquet(dataset, directory: str | os.PathLike) -> None:
    """Ray Data's write_parquet into a directory, local or in an object store (every worker writes its blocks
    there directly: a local path on a multi-node cluster would scatter them over the nodes' disks)."""
    (target,), filesystem = arrow_paths([UPath(directory)])
    dataset.write_parquet(target, filesystem=filesystem)


TEMPORARY_SUFFIX = ".tmp"
_TEMPORARY = re.compile(r"^\..+\.(?P<pid>\d+)\.tmp$")  # atomic_write's: .<name>.<pid>.tmp


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
    """Delete the temporaries that atomic_write leaves under a local `directory` when its process is killed
    mid-write (a live process's are kept); returns how many. An object store gets none: its writes are one put."""
    directory = UPath(directory)
    if is_remote(directory) or not directory.is_dir():
        return 0
    removed = 0
    for path in Path(directory).rglob(f".*{TEMPORARY_SUFFIX}"):
        found = _TEMPORARY.match(path.name)
        if found and path.is_file() and not _alive(int(found["pid"])):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that appears at `target` whole or not at all: locally written beside it and renamed; for
    an object store written to local scratch, then uploaded in one put (an object is visible only once complete)."""
    target = UPath(target)
    if is_remote(target):
        with tempfile.TemporaryDirectory(prefix="clipforge-upload-") as scratch:
            local = Path(scratch) / target.name
            with open(local, "wb") as file:
                yield file
            target.fs.put_file(str(local), target.path)
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    try:
        with open(tmp, "wb") as file:
            yield file
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet(table: pa.Table, target: str | os.PathLike) -> None:
    with atomic_write(target) as file:
        pq.write_table(table, file)


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_write(target) as file:
        file.write(text.encode("utf-8"))


def remove_tree(where: str | os.PathLike) -> None:
    """Delete a directory and everything under it; nothing when it does not exist."""
    where = UPath(where)
    if not is_remote(where):
        shutil.rmtree(where, ignore_errors=True)
    elif where.fs.exists(where.path):
        where.fs.rm(where.path, recursive=True)


# Written into every output directory a stage replaces on its next run (an export, a filter's shards): what marks
# a directory as ours to delete. An export written before the marker existed is known by its clipforge.json.
OUTPUT_MARKER = ".clipforge-output"
_LEGACY_MARKERS = ("clipforge.json",)


def _key(where: UPath) -> str:
    return str(where.resolve() if not is_remote(where) else where).rstrip("/")


def _overlaps(a: UPath, b: UPath) -> bool:
    """True when a and b are one location, or one lies inside the other."""
    a, b = _key(a), _key(b)
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def check_output(directory: str | os.PathLike, setting: str, inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """ValueError, one line naming `setting`, when `directory` is, holds or lies inside one of `inputs`, or holds
    files but no marker of ours: we never delete what we did not write (`export_dir=s3://bucket` must not empty a
    bucket). A stage calls it before it starts its work, and replace_output again when it writes."""
    directory = UPath(directory)
    for source in inputs:
        if _overlaps(directory, UPath(source)):
            raise ValueError(f"{setting}={directory} overlaps the input {source}: writing it would delete the input; "
                             f"choose another {setting}")
    if directory.exists():
        names = {entry.name for entry in directory.iterdir()}
        if names and not names & {OUTPUT_MARKER, *_LEGACY_MARKERS}:
            raise ValueError(f"{setting}={directory} holds files clipforge did not write ({len(names)} entries, no "
                             f"{OUTPUT_MARKER}): choose an empty or new {setting}")


def replace_output(directory: str | os.PathLike, setting: str, inputs: tuple[str | os.PathLike, ...] = ()) -> UPath:
    """Empty `directory` (local or in an object store) for a stage to write its output into, once check_output
    allows it, and mark it ours. Returns the directory."""
    check_output(directory, setting, inputs)
    directory = UPath(directory)
    if directory.exists():
        remove_tree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / OUTPUT_MARKER).write_text("written by clipforge: a rerun replaces this directory\n")
    return directory


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A local directory to write `target`'s files into: the directory itself when local; for an object store
    a scratch directory uploaded to `target` when the block ends without error."""
    target = UPath(target)
    if not is_remote(target):
        target.mkdir(parents=True, exist_ok=True)
        yield Path(target)
        return
    with tempfile.TemporaryDirectory(prefix="clipforge-stage-") as scratch:
        yield Path(scratch)
        target.fs.put(f"{scratch}/", target.path, recursive=True)


@contextlib.contextmanager
def local_copy(source: str | os.PathLike) -> Iterator[Path]:
    """A local path holding `source` (a model export or tokenizer directory, a file) for the block: `source`
    itself when local, else a scratch copy downloaded from the object store."""
    source = UPath(source)
    if not is_remote(source):
        yield Path(source)
        return
    with tempfile.TemporaryDirectory(prefix="clipforge-download-") as scratch:
        if source.is_file():
            local = Path(scratch) / source.name
            source.fs.get_file(source.path, str(local))
            yield local
        else:
            yield download(source, Path(scratch))


@contextlib.contextmanager
def local_paths(values: dict, keys: tuple[str, ...]) -> Iterator[dict]:
    """`values` with each of `keys` that holds an object-store location replaced by a local copy for the block:
    what a model's constructor reads (a pretrained directory, a teacher, a whitening file) on any node."""
    with contextlib.ExitStack() as stack:
        out = dict(values)
        for key in keys:
            if out.get(key) and is_remote(out[key]):
                out[key] = str(stack.enter_context(local_copy(out[key])))
        yield out


def upload(local: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy a local file or directory to `target` (local or in an object store), replacing what was there."""
    target, local = UPath(target), Path(local)
    if local.is_dir():
        remove_tree(target)
    if not is_remote(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if local.is_dir() else shutil.copyfile)(local, target)
    elif local.is_dir():
        target.fs.put(f"{local}/", target.path, recursive=True)
    else:
        target.fs.put_file(str(local), target.path)


def download(source: str | os.PathLike, local: Path) -> Path:
    """Copy the files under `source` (an object-store directory) into the local directory `local`."""
    source = UPath(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    local.mkdir(parents=True, exist_ok=True)
    source.fs.get(f"{source.path.rstrip('/')}/", f"{local}/", recursive=True)
    return local
