"""Stage 3 of ingest: staging part + its drop list -> WebDataset tar, Parquet metadata, dropped rows, stats.

Output layout (img2dataset's conventions, readable by `ray.data.read_webdataset`, `webdataset.WebDataset`
and open_clip's `--train-data "dir/{00000..00009}.tar"`):
    00017.tar            {key}.jpg|png|webp, {key}.txt (caption), {key}.json (every carried column)
    00017.parquet        the same rows (no image bytes) plus width/height/hashes
    00017_stats.json     counts for this part; written last, so it marks the shard as done
    _dropped/00017.parquet   every dropped row with its reason: nothing is lost
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from upath import UPath

from components import storage
from components.data.dedup import read_part_drops
from components.data.process_part import OK

# Columns that are per-sample payload or bookkeeping rather than metadata to carry into {key}.json.
_NOT_IN_JSON = {"image", "part"}
IMAGE_EXTENSIONS = {"jpg": "jpg", "png": "png", "webp": "webp"}


def stats_file(output_dir: UPath, part: str) -> UPath:
    return output_dir / f"{part}_stats.json"


def write_shard(staging_file: UPath, drops_dir: UPath, output_dir: UPath, encode_format: str) -> dict[str, Any]:
    """Write shard `part` and return its stats: {"part", "input", "kept", "dropped": {reason: n}}."""
    started = time.perf_counter()
    staging_file, drops_dir, output_dir = UPath(staging_file), UPath(drops_dir), UPath(output_dir)
    part = staging_file.stem.removeprefix("part-")
    table = storage.read_parquet(staging_file)
    drops = read_part_drops(drops_dir, part)
    status = table.column("status").to_pylist()
    keys = table.column("key").to_pylist()
    twins: list[str | None] = [None] * len(keys)
    for i, key in enumerate(keys):
        if status[i] == OK and key in drops:
            status[i], twins[i] = drops[key]
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    table = table.append_column("duplicate_of", pa.array(twins, pa.string()))

    is_kept = pa.array([s == OK for s in status])
    kept = table.filter(is_kept)
    dropped = table.filter(pc.invert(is_kept)).drop_columns(["image"])
    extension = IMAGE_EXTENSIONS[encode_format]

    _write_tar(kept, output_dir / f"{part}.tar", extension)
    storage.write_parquet(kept.drop_columns(["image"]), output_dir / f"{part}.parquet")
    (output_dir / "_dropped").mkdir(exist_ok=True)
    storage.write_parquet(dropped, output_dir / "_dropped" / f"{part}.parquet")

    stats = {
        "part": part,
        "input": table.num_rows,
        "kept": kept.num_rows,
        "dropped": dict(Counter(s for s in status if s != OK)),
        "image_bytes": sum(len(b) for b in kept.column("image").to_pylist()),
        "seconds": time.perf_counter() - started,
    }
    storage.write_text(stats_file(output_dir, part), json.dumps(stats, indent=1))
    return stats


def _write_tar(kept: pa.Table, path: UPath, extension: str) -> None:
    import webdataset as wds

    metadata_columns = [c for c in kept.column_names if c not in _NOT_IN_JSON]
    # mtime fixed: the same input gives byte-identical tars (reproducible shards).
    with storage.atomic_write(path) as file, wds.TarWriter(file, encoder=False, mtime=0) as tar:
        for row in kept.to_pylist():
            meta = {c: row[c] for c in metadata_columns}
            tar.write({"__key__": row["key"], extension: row["image"], "txt": (row["caption"] or "").encode("utf-8"),
                       "json": json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8")})


class ShardWriter:
    """A Ray Data callable: write one shard per input row {"staging": path}."""

    def __init__(self, drops_dir: str, output_dir: str, encode_format: str):
        self.drops_dir, self.output_dir, self.encode_format = UPath(drops_dir), UPath(output_dir), encode_format

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        stats = [write_shard(UPath(s), self.drops_dir, self.output_dir, self.encode_format) for s in batch["staging"]]
        return {"stats": [json.dumps(s) for s in stats]}
