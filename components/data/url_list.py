"""Read URL lists (Parquet, CSV/TSV, JSONL, gzipped too) and cut them into fixed-size input parts.

A URL list is a file, a folder (every list file in it), a glob, or a list of these (LAION's metadata is 32
Parquet files): their rows in order, as one list. The driver streams it once in record batches (never holding a
file whole) and writes part files of `shard_size` rows. A part is the unit of work, of resume and of output: part 17
becomes shard 00017. Keys follow img2dataset: shard id then index inside the shard, zero-padded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from upath import UPath

from components import storage
from components.secrets import redacted_text

READ_BATCH_ROWS = 65_536
READ_BLOCK_BYTES = 16 << 20  # CSV and JSONL are parsed in blocks of this size


class UrlListError(ValueError):
    """The URL list cannot be used as given; the message says why in one line."""


def _file_name(path: str) -> str:
    """The path's file name in lower case, without a URL's query string (a presigned URL's signature)."""
    return (urlsplit(path).path if "://" in path else path).lower()


def list_format(path: str) -> str:
    name = _file_name(path).removesuffix(".gz")
    for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix):
            return fmt
    raise UrlListError(f"unknown URL list format for {redacted_text(path)}: use .parquet, .csv, .tsv or .jsonl "
                       "(optionally .gz)")


UrlList = str | Sequence[str]  # a file, folder or glob, or several
LIST_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".json")


def _is_list_file(path: str) -> bool:
    return _file_name(path).removesuffix(".gz").endswith(LIST_SUFFIXES)


def list_files(url_list: UrlList) -> list[str]:
    """The files of a URL list setting, in order: a file as it is, a folder's list files and a glob's matches
    sorted by name (a folder searched recursively). UrlListError when an entry names nothing."""
    files = []
    for entry in [url_list] if isinstance(url_list, str) else list(url_list):
        if urlsplit(entry).scheme in ("http", "https"):  # a (presigned) URL: `?` starts its query, not a glob
            files.append(entry)
            continue
        fs, fs_path = fsspec.core.url_to_fs(entry)
        protocol = entry.split("://", 1)[0] + "://" if "://" in entry else ""
        if any(c in fs_path for c in "*?["):
            found = [p for p in fs.glob(fs_path) if _is_list_file(p)]
        elif fs.isdir(fs_path):
            found = [p for p in fs.find(fs_path) if _is_list_file(p)]
        else:
            files.append(entry)
            continue
        if not found:
            raise UrlListError(f"no URL list files ({', '.join(LIST_SUFFIXES)}, optionally .gz) in "
                               f"{redacted_text(entry)}")
        files.extend(protocol + p if protocol and not p.startswith(protocol) else p for p in sorted(found))
    if not files:
        raise UrlListError("the URL list names no file")
    return files


def iter_list_batches(url_list: UrlList, url_col: str, caption_col: str) -> Iterator[pa.RecordBatch]:
    """Every file's rows in order, each batch with the URL and caption columns normalised (_normalise_columns)."""
    for path in list_files(url_list):
        for batch in iter_batches(path):
            yield _normalise_columns(batch, url_col, caption_col, path)


def iter_batches(path: str) -> Iterator[pa.RecordBatch]:
    """Stream one URL list file as record batches; every column is kept."""
    fmt = list_format(path)
    if fmt == "parquet":
        with fsspec.open(path, "rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH_ROWS)
        return
    with fsspec.open(path, "rb", compression="gzip" if _file_name(path).endswith(".gz") else None) as f:
        if fmt == "jsonl":
            # Streamed block by block; the columns are the first block's.
            yield from pa_json.open_json(f, read_options=pa_json.ReadOptions(block_size=READ_BLOCK_BYTES))
            return
        parse = pa_csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
        convert = pa_csv.ConvertOptions(strings_can_be_null=True)
        reader = pa_csv.open_csv(f, parse_options=parse, convert_options=convert,
                                 read_options=pa_csv.ReadOptions(block_size=READ_BLOCK_BYTES))
        yield from reader


def check_url_list(url_list: UrlList, url_col: str = "url", caption_col: str = "caption") -> None:
    """UrlListError when a file of the list cannot be ingested as given (format, existence, columns), each read
    from its first batch: a bad list is refused before a cluster starts."""
    files = list_files(url_list)
    for path in files:
        list_format(path)
    list_identity(url_list)
    for path in files:
        first = next(iter_batches(path), None)
        if first is not None:
            _normalise_columns(first, url_col, caption_col, path)


def key_digits(shard_size: int) -> int:
    return max(1, math.ceil(math.log10(shard_size)))


def make_key(part: int, index: int, shard_size: int) -> str:
    return f"{part:05d}{index:0{key_digits(shard_size)}d}"


def list_identity(url_list: UrlList) -> dict | list[dict]:
    """The list's files' fingerprints for resume checks (one file: its fingerprint alone, as before lists of
    several files existed); UrlListError when a file does not exist."""
    found = []
    for path in list_files(url_list):
        try:
            found.append(fingerprint(path))
        except FileNotFoundError:
            raise UrlListError(f"URL list {redacted_text(path)} does not exist") from None
    return found[0] if len(found) == 1 else found


def fingerprint(path: str) -> dict:
    """Identity of an input file for resume checks: path, size and modification time."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    info = fs.info(fs_path)
    return {"path": redacted_text(path), "size": info.get("size"),
            "mtime": str(info.get("mtime") or info.get("LastModified"))}


def shuffled(batches: Iterator[pa.RecordBatch], window: int, seed: int) -> Iterator[pa.RecordBatch]:
    """The rows of `batches` in a seeded random order, holding at most `window` rows plus one batch: every
    incoming batch adds its rows and the rows beyond `window` leave, drawn at random from all that are held. A list
    of up to `window` rows comes out in one uniform permutation; a longer one is shuffled within a sliding window
    (at web scale, shuffle the list itself beforehand, as img2dataset users do)."""
    rng = np.random.default_rng(seed)
    held: pa.Table | None = None
    for batch in batches:
        arrived = pa.Table.from_batches([batch])
        held = arrived if held is None else pa.concat_tables([held, arrived], promote_options="permissive")
        if held.num_rows > window:
            order = rng.permutation(held.num_rows)
            yield from held.take(order[:held.num_rows - window]).to_batches()
            held = held.take(order[held.num_rows - window:])
    if held is not None and held.num_rows:
        yield from held.take(rng.permutation(held.num_rows)).to_batches()


PARTS_DONE = "_done.json"  # written once every part of a list is cut: what it was cut from, the parts, the rows


def parts_identity(url_list: UrlList, shard_size: int, url_col: str = "url", caption_col: str = "caption",
                   shuffle_window: int = 0, shuffle_seed: int = 0) -> dict:
    """What a list's parts are cut from and how: its files' fingerprints and the cutting settings. UrlListError
    when a file does not exist or has an unknown format."""
    for path in list_files(url_list):
        list_format(path)
    identity = {"input": list_identity(url_list), "shard_size": shard_size, "url_col": url_col,
                "caption_col": caption_col}
    if shuffle_window:  # (absent when off: parts cut before the option still match)
        identity["shuffle"] = {"window": shuffle_window, "seed": shuffle_seed}
    return identity


def split_into_parts(
    url_list: UrlList,
    parts_dir: UPath,
    shard_size: int,
    url_col: str = "url",
    caption_col: str = "caption",
    shuffle_window: int = 0,
    shuffle_seed: int = 0,
    first_part: int = 0,
) -> list[UPath]:
    """Write `parts_dir/part-XXXXX.parquet` files of `shard_size` rows with columns key, url, caption, extras; with
    `shuffle_window` > 0 the rows go into the parts in a seeded random order (`shuffled`), else in the list's. Parts
    are numbered from `first_part` (a list appended to a dataset continues its numbering).

    Reuses existing parts when `parts_dir/_done.json` matches this input, so a rerun never re-keys rows.
    """
    identity = parts_identity(url_list, shard_size, url_col, caption_col, shuffle_window, shuffle_seed)
    parts_dir.mkdir(parents=True, exist_ok=True)
    done_file = parts_dir / PARTS_DONE
    if done_file.exists():
        done = json.loads(done_file.read_text())
        if done["identity"] == identity:
            return [parts_dir / name for name in done["parts"]]
        raise UrlListError(f"{parts_dir} was cut from a different input, shard size or shuffle; use a new output_dir")

    batches = iter_list_batches(url_list, url_col, caption_col)
    if shuffle_window:
        batches = shuffled(batches, shuffle_window, shuffle_seed)
    parts, total = cut_into_parts(batches, parts_dir, shard_size, first_part)
    if total == 0:
        raise UrlListError(f"{redacted_text(str(url_list))} holds no rows")
    storage.write_text(done_file, json.dumps({"identity": identity, "parts": [p.name for p in parts], "rows": total}))
    return parts


def cut_into_parts(batches: Iterator[pa.RecordBatch], parts_dir: UPath, shard_size: int, first_part: int = 0,
                   ) -> tuple[list[UPath], int]:
    """Write the rows of `batches` as part files of `shard_size` rows, numbered from `first_part`, each row keyed
    by its part and index (`make_key`); returns (the part files, rows written)."""
    parts: list[UPath] = []
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    total = 0

    def flush(tables: list[pa.RecordBatch]) -> None:
        part = first_part + len(parts)
        # Files of one list may type a column differently (a CSV's integers, a Parquet's floats): unified.
        table = pa.concat_tables([pa.Table.from_batches([b]) for b in tables], promote_options="permissive")
        keys = pa.array([make_key(part, i, shard_size) for i in range(table.num_rows)])
        table = table.add_column(0, "key", keys)
        out = parts_dir / f"part-{part:05d}.parquet"
        storage.write_parquet(table, out)
        parts.append(out)

    for batch in batches:
        total += batch.num_rows
        while batch.num_rows:
            take = min(shard_size - pending_rows, batch.num_rows)
            pending.append(batch.slice(0, take))
            pending_rows += take
            batch = batch.slice(take)
            if pending_rows == shard_size:
                flush(pending)
                pending, pending_rows = [], 0
    if pending_rows:
        flush(pending)
    return parts, total


# Columns ingest writes itself (keys, the staging rows of stage 1, the shards' Parquet). DataComp-style lists carry
# some of the same names; such an input column is carried as source_<name> rather than overwritten.
OWN_COLUMNS = ("key", "status", "error_message", "width", "height", "original_width", "original_height", "sha256",
               "phash", "language", "language_score", "model_score")


def listed_rows(parts_dir: UPath) -> int:
    """How many rows split_into_parts read from the URL list into `parts_dir` (recorded as it cut the parts)."""
    return json.loads((parts_dir / PARTS_DONE).read_text())["rows"]


def _normalise_columns(batch: pa.RecordBatch, url_col: str, caption_col: str, path: str) -> pa.RecordBatch:
    names = batch.schema.names
    missing = [c for c in (url_col, caption_col) if c not in names]
    if missing:
        raise UrlListError(f"{redacted_text(path)} lacks column(s) {missing}; it has {names} "
                          "(set data.url_col / data.caption_col)")
    rename = {url_col: "url", caption_col: "caption", **{name: f"source_{name}" for name in OWN_COLUMNS}}
    if "image" in names and not pa.types.is_binary(batch.schema.field("image").type):
        rename["image"] = "source_image"  # image bytes of a local list (the built-in corpus); a path or URL is not
    renamed = [rename.get(n, n) for n in names]
    batch = batch.rename_columns(renamed)
    # url and caption are strings everywhere downstream, whatever the reader inferred.
    columns = [batch.column(i).cast(pa.string()) if n in ("url", "caption") else batch.column(i) for i, n in enumerate(renamed)]
    return pa.RecordBatch.from_arrays(columns, names=renamed)

