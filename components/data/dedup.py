"""Global deduplication as a distributed Ray Data pass over metadata only (key, sha256, phash).

- exact: rows are hash-partitioned by sha256 of the downloaded bytes; in each group the smallest key stays.
- near: 64-bit pHash split into `max_distance + 1` bands. By pigeonhole, two hashes within Hamming distance d
  agree exactly on at least one band, so grouping by (band, band value) finds every near pair. Rule: a row is
  dropped when some row with a smaller key lies within distance d. The smallest key of every cluster stays,
  every dropped row has a near twin with a smaller key, and the result does not depend on execution order.

Only groups are ever held in memory: one sha256 value, or one band value (about N / 2^(64/(d+1)) rows).
The drop list is written partitioned by part, so the shard writer for part p reads only its own drops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import ray

DROP_COLUMNS = ["key", "part", "reason", "duplicate_of"]


def band_masks(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of each band: the 64 bits split into max_distance + 1 near-equal runs."""
    bands = max_distance + 1
    edges = np.linspace(0, 64, bands + 1).round().astype(int)
    return [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of int64 hashes (broadcasting)."""
    x = np.bitwise_xor(a.astype(np.int64), b.astype(np.int64)).view(np.uint64)
    return np.bitwise_count(x)


def exact_group(group: pd.DataFrame) -> pd.DataFrame:
    group = group.sort_values("key")
    keep = group["key"].iloc[0]
    dropped = group.iloc[1:]
    return pd.DataFrame({"key": dropped["key"], "part": dropped["part"], "reason": "duplicate_exact",
                         "duplicate_of": keep})


def near_group(group: pd.DataFrame, max_distance: int, block_rows: int = 2048) -> pd.DataFrame:
    group = group.sort_values("key")
    keys = group["key"].to_numpy()
    hashes = group["phash"].to_numpy(np.int64)
    dropped, twins = [np.empty(0, int)], [np.empty(0, int)]
    # Row blocks keep memory at block_rows x group size even for a crowded band value.
    for start in range(0, len(keys), block_rows):
        rows = np.arange(start, min(start + block_rows, len(keys)))
        if rows[-1] == 0:
            continue  # the first row has no smaller key to be a twin of
        near = hamming(hashes[rows, None], hashes[None, : rows[-1]]) <= max_distance
        near &= np.arange(rows[-1])[None, :] < rows[:, None]  # only rows with a smaller key count as twins
        hit = near.any(axis=1)
        dropped.append(rows[hit])
        twins.append(near[hit].argmax(axis=1))
    dropped_rows, twin_rows = np.concatenate(dropped), np.concatenate(twins)
    return pd.DataFrame({"key": keys[dropped_rows], "part": group["part"].to_numpy()[dropped_rows],
                         "reason": "duplicate_near", "duplicate_of": keys[twin_rows]})


def _with_part(batch: pd.DataFrame) -> pd.DataFrame:
    batch = batch[batch["status"] == "ok"]
    return batch.assign(part=batch["key"].str.slice(0, 5))


def _explode_bands(batch: pd.DataFrame, max_distance: int) -> pd.DataFrame:
    frames = []
    hashes = batch["phash"].to_numpy(np.int64).view(np.uint64)
    for band, (shift, mask) in enumerate(band_masks(max_distance)):
        values = (hashes >> np.uint64(shift)) & np.uint64(mask)
        # One int64 group id per (band, band value): band index in the top byte.
        frames.append(batch.assign(band_key=(values | np.uint64(band << 56)).astype(np.int64)))
    return pd.concat(frames, ignore_index=True)


def find_duplicates(staging_files: list[Path], drops_dir: Path, exact: bool, near_distance: int | None,
                    num_partitions: int | None = None) -> None:
    """Write the drop list under drops_dir/part=<part>/ (nothing when there are no duplicates)."""
    if not exact and near_distance is None:
        return
    metadata = ray.data.read_parquet([str(f) for f in staging_files], columns=["key", "status", "sha256", "phash"])
    metadata = metadata.map_batches(_with_part, batch_format="pandas")
    drops = []
    if exact:
        drops.append(metadata.groupby("sha256", num_partitions=num_partitions)
                     .map_groups(exact_group, batch_format="pandas"))
    if near_distance is not None:
        # Exact duplicates are someone's near twin too (distance 0); the shard writer keeps one reason per key.
        bands = metadata.map_batches(_explode_bands, fn_kwargs={"max_distance": near_distance}, batch_format="pandas")
        drops.append(bands.groupby("band_key", num_partitions=num_partitions)
                     .map_groups(near_group, fn_kwargs={"max_distance": near_distance}, batch_format="pandas"))
    dropped = drops[0].union(*drops[1:]) if len(drops) > 1 else drops[0]
    dropped = dropped.map_batches(lambda b: b[DROP_COLUMNS], batch_format="pandas")
    dropped.write_parquet(str(drops_dir), partition_cols=["part"])


def read_part_drops(drops_dir: Path, part: str) -> dict[str, tuple[str, str]]:
    """key -> (reason, duplicate_of) for one part; exact wins over near when a key has both."""
    import pyarrow.parquet as pq

    part_dir = drops_dir / f"part={part}"
    if not part_dir.exists():
        return {}
    table = pq.read_table(part_dir, partitioning=None)
    order = pc.sort_indices(table, [("reason", "ascending")])  # "duplicate_exact" < "duplicate_near"
    drops: dict[str, tuple[str, str]] = {}
    for key, reason, twin in zip(*(table.take(order).column(c).to_pylist() for c in ("key", "reason", "duplicate_of"))):
        drops.setdefault(key, (reason, twin))
    return drops
