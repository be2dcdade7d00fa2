"""Global deduplication as a distributed Ray Data pass over metadata only (key, sha256, phash).

- exact: a row is dropped when a row with a smaller key has the same sha256 of the downloaded bytes;
  duplicate_of is the smallest key with that sha256.
- near: 64-bit pHash split into `max_distance + 1` bands. By pigeonhole, two hashes within Hamming distance d
  agree exactly on at least one band, so comparing the rows that share a (band, band value) finds every near
  pair. Rule: a row is dropped when some row with a smaller key lies within distance d; duplicate_of is the
  smallest such key. The smallest key of every cluster stays, every dropped row has a near twin with a
  smaller key, and the result does not depend on execution order.

The pass: each staging file is read (four columns, with pyarrow) into records: one per row for exact
(shuffle key sha256) and one per row and band for near (shuffle key band_key), and each record gets
bucket = hash(shuffle key) % B. Records are shuffled by bucket into P partitions, P = max(num_partitions,
total rows / ROWS_PER_PARTITION), B = BUCKETS_PER_PARTITION x P, so memory per worker stays bounded however
large the dataset grows; each bucket is processed vectorised (sorts and a pairwise pass over the rows that
share a band value), never one Python call per group. Rows with an identical (band value, pHash) collapse
into one class first, so thousands of copies of one image cost one class; a band value with more than
CROWDED_CLASSES distinct hashes goes through `near_group`'s blockwise kernel.

A key can be reported once per bucket it lands in (exact, and near in up to d + 1 buckets); read_part_drops
resolves that: exact wins over near, and among near rows the smallest duplicate_of.
The drop list is written partitioned by part, so the shard writer for part p reads only its own drops.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray
from upath import UPath

from components import storage

DROP_COLUMNS = ["key", "part", "reason", "duplicate_of"]
ROWS_PER_PARTITION = 250_000  # staging rows per shuffle partition: about (d + 2) x this many records in a worker
BUCKETS_PER_PARTITION = 16  # Ray places buckets on partitions by its own hash: many small ones even the load out
CROWDED_CLASSES = 2048  # a band value with more distinct hashes than this goes through blockwise near_group
PAIRS_PER_STEP = 1 << 22  # candidate pairs materialised at once (moderate band values)
BLOCK_CELLS = 1 << 22  # hash comparisons materialised at once (crowded band values)
EXACT_BAND = -1  # band_key of exact records (a real band_key has the band index, at most 64, in its top byte)

_RECORD_SCHEMA = pa.schema([("key", pa.string()), ("sha256", pa.string()), ("phash", pa.int64()),
                            ("band_key", pa.int64()), ("bucket", pa.int64())])
_DROP_SCHEMA = pa.schema([("key", pa.string()), ("part", pa.string()), ("reason", pa.string()),
                          ("duplicate_of", pa.string())])


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
    """The exact rule for the rows of one sha256 (reference; the pass uses the vectorised _exact_drops)."""
    group = group.sort_values("key")
    keep = group["key"].iloc[0]
    dropped = group.iloc[1:]
    return pd.DataFrame({"key": dropped["key"], "part": dropped["part"], "reason": "duplicate_exact",
                         "duplicate_of": keep})


def _first_twins(hashes: np.ndarray, max_distance: int, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """For hashes in key order: (rows with a near twin earlier in the order, the first such twin of each)."""
    dropped, twins = [np.empty(0, int)], [np.empty(0, int)]
    # Row blocks keep memory at block_rows x group size even for a crowded band value.
    for start in range(0, len(hashes), block_rows):
        rows = np.arange(start, min(start + block_rows, len(hashes)))
        if rows[-1] == 0:
            continue  # the first row has no smaller key to be a twin of
        near = hamming(hashes[rows, None], hashes[None, : rows[-1]]) <= max_distance
        near &= np.arange(rows[-1])[None, :] < rows[:, None]  # only rows with a smaller key count as twins
        hit = near.any(axis=1)
        dropped.append(rows[hit])
        twins.append(near[hit].argmax(axis=1))
    return np.concatenate(dropped), np.concatenate(twins)


def near_group(group: pd.DataFrame, max_distance: int, block_rows: int = 2048) -> pd.DataFrame:
    """The near rule for the rows of one band value, blockwise: each dropped row with its smallest-key twin."""
    group = group.sort_values("key")
    keys = group["key"].to_numpy()
    dropped_rows, twin_rows = _first_twins(group["phash"].to_numpy(np.int64), max_distance, block_rows)
    return pd.DataFrame({"key": keys[dropped_rows], "part": group["part"].to_numpy()[dropped_rows],
                         "reason": "duplicate_near", "duplicate_of": keys[twin_rows]})


def _bucket_of(values: np.ndarray, buckets: int) -> np.ndarray:
    # pandas' hash_array is seeded with a fixed key: the same value lands in the same bucket in every process.
    return (pd.util.hash_array(values) % np.uint64(buckets)).astype(np.int64)


def _records(table: pa.Table, exact: bool, max_distance: int | None, buckets: int) -> pa.Table:
    """Staging rows (key, status, sha256, phash) -> exact and band records with their bucket."""
    table = table.filter(pc.equal(table["status"], "ok"))
    keys = table["key"].cast(pa.string())
    frames = []
    if exact:
        valid = pc.is_valid(table["sha256"])
        rows = table.filter(valid)
        sha = rows["sha256"].cast(pa.string())
        frames.append(pa.table({
            "key": keys.filter(valid), "sha256": sha, "phash": pa.array(np.zeros(len(rows), np.int64)),
            "band_key": pa.array(np.full(len(rows), EXACT_BAND, np.int64)),
            "bucket": pa.array(_bucket_of(sha.to_numpy(zero_copy_only=False), buckets))}, schema=_RECORD_SCHEMA))
    if max_distance is not None:
        valid = pc.is_valid(table["phash"])
        hashes = table["phash"].filter(valid).to_numpy().astype(np.int64)
        near_keys = keys.filter(valid)
        unsigned = hashes.view(np.uint64)
        for band, (shift, mask) in enumerate(band_masks(max_distance)):
            values = (unsigned >> np.uint64(shift)) & np.uint64(mask)
            # One int64 id per (band, band value): band index in the top byte.
            band_key = (values | np.uint64(band << 56)).view(np.int64)
            frames.append(pa.table({
                "key": near_keys, "sha256": pa.nulls(len(hashes), pa.string()), "phash": pa.array(hashes),
                "band_key": pa.array(band_key), "bucket": pa.array(_bucket_of(band_key, buckets))},
                schema=_RECORD_SCHEMA))
    return pa.concat_tables(frames) if frames else _RECORD_SCHEMA.empty_table()


def _read_staging(batch: dict, exact: bool, max_distance: int | None, buckets: int) -> pa.Table:
    tables = [_records(storage.read_parquet(path, columns=["key", "status", "sha256", "phash"]), exact, max_distance,
                       buckets) for path in batch["path"]]
    return pa.concat_tables(tables)


def _exact_drops(records: pa.Table) -> tuple[pa.Array, pa.Array]:
    """Records of one bucket -> (dropped keys, smallest key with the same sha256)."""
    records = records.select(["key", "sha256"]).sort_by([("sha256", "ascending"), ("key", "ascending")])
    sha, keys = records["sha256"].combine_chunks(), records["key"].combine_chunks()
    n = len(sha)
    first = np.ones(n, bool)
    if n > 1:
        first[1:] = pc.not_equal(sha.slice(1), sha.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    run_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    dropped = np.flatnonzero(~first)
    return keys.take(dropped), keys.take(run_start[dropped])


def _class_twins(c_hash: np.ndarray, c_min: np.ndarray, g_start: np.ndarray, g_size: np.ndarray,
                 max_distance: int) -> np.ndarray:
    """Per class (distinct pHash within a band value): the smallest key rank among it and its near classes."""
    best = c_min.copy()
    moderate = np.flatnonzero((g_size >= 2) & (g_size <= CROWDED_CLASSES))
    pairs = g_size[moderate] * (g_size[moderate] - 1) // 2
    step = np.cumsum(pairs) // PAIRS_PER_STEP  # runs of band values whose pairs fit in one step
    for s in np.unique(step):
        starts, sizes = g_start[moderate[step == s]], g_size[moderate[step == s]]
        offsets = np.repeat(np.cumsum(sizes) - sizes, sizes)
        pos = np.arange(sizes.sum()) - offsets  # position of each class within its band value
        cls = np.repeat(starts, sizes) + pos
        a = np.repeat(cls, pos)  # every class paired with each earlier class of its band value
        b = np.repeat(cls - pos, pos) + (np.arange(len(a)) - np.repeat(np.cumsum(pos) - pos, pos))
        near = hamming(c_hash[a], c_hash[b]) <= max_distance
        a, b = a[near], b[near]
        np.minimum.at(best, a, c_min[b])
        np.minimum.at(best, b, c_min[a])
    for start, size in zip(g_start[g_size > CROWDED_CLASSES], g_size[g_size > CROWDED_CLASSES]):
        order = start + np.argsort(c_min[start:start + size])  # near_group's blockwise kernel, in key order
        rows, twins = _first_twins(c_hash[order], max_distance, max(1, BLOCK_CELLS // int(size)))
        best[order[rows]] = np.minimum(best[order[rows]], c_min[order[twins]])
    return best


def _near_drops(records: pa.Table, max_distance: int) -> tuple[pa.Array, pa.Array]:
    """Band records of one bucket -> (dropped keys, their smallest-key near twin among these records)."""
    keys = records["key"].combine_chunks()
    rank = pc.rank(keys, sort_keys="ascending", tiebreaker="dense").to_numpy().astype(np.int64) - 1
    band, hashes = records["band_key"].to_numpy(), records["phash"].to_numpy()
    order = np.lexsort((rank, hashes, band))
    band, hashes, rank = band[order], hashes[order], rank[order]
    new_class = np.ones(len(order), bool)
    new_class[1:] = (band[1:] != band[:-1]) | (hashes[1:] != hashes[:-1])
    c_start = np.flatnonzero(new_class)
    c_band, c_hash, c_min = band[c_start], hashes[c_start], rank[c_start]  # rows sorted by rank in a class
    new_group = np.ones(len(c_start), bool)
    new_group[1:] = c_band[1:] != c_band[:-1]
    g_start = np.flatnonzero(new_group)
    g_size = np.diff(np.append(g_start, len(c_start)))
    twin = _class_twins(c_hash, c_min, g_start, g_size, max_distance)[np.cumsum(new_class) - 1]
    hit = twin < rank
    # A key is in up to d + 1 band values of this bucket: keep its smallest twin.
    smallest = np.full(int(rank.max()) + 1 if len(rank) else 0, np.iinfo(np.int64).max)
    np.minimum.at(smallest, rank[hit], twin[hit])
    dropped = np.flatnonzero(smallest < np.iinfo(np.int64).max)
    row_of_rank = np.empty(len(smallest), np.int64)
    row_of_rank[rank] = order
    return keys.take(row_of_rank[dropped]), keys.take(row_of_rank[smallest[dropped]])


def _bucket_drops(records: pa.Table, max_distance: int | None, index_digits: int) -> pa.Table:
    """All records of one bucket -> its drop rows (key, part, reason, duplicate_of). A key is the part's number
    (five digits, more from part 100,000 on) then the row's index in `index_digits` digits."""
    is_exact = pc.equal(records["band_key"], EXACT_BAND)
    found = []
    for reason, rows, drops in (("duplicate_exact", records.filter(is_exact), _exact_drops),
                                ("duplicate_near", records.filter(pc.invert(is_exact)), _near_drops)):
        if len(rows):
            key, twin = drops(rows) if reason == "duplicate_exact" else drops(rows, max_distance)
            found.append(pa.table({"key": key, "part": pc.utf8_slice_codeunits(key, 0, -index_digits),
                                   "reason": pa.array([reason] * len(key), pa.string()), "duplicate_of": twin},
                                  schema=_DROP_SCHEMA))
    return pa.concat_tables(found) if found else _DROP_SCHEMA.empty_table()


def _count_rows(files: list[UPath]) -> int:
    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(storage.parquet_rows, files))


def find_duplicates(staging_files: list[UPath], drops_dir: UPath, exact: bool, near_distance: int | None,
                    index_digits: int, num_partitions: int | None = None, reference_files: list[UPath] = ()) -> None:
    """Write the drop list under drops_dir/part=<part>/ (nothing when there are no duplicates); keys end in
    `index_digits` digits of row index (components/data/url_list.make_key).

    `reference_files`: Parquet files of rows already deduplicated by the same rule (the shards of a dataset that
    a round is added to) with smaller keys than every staging row. They take part in the pass, so a staging row
    within reach of one is dropped as its duplicate, and they are never dropped themselves: no reference row has
    a smaller-key twin among the references, and every staging key is larger."""
    if (not exact and near_distance is None) or not staging_files:
        return
    files = [*reference_files, *staging_files]
    partitions = num_partitions or 2 * int(ray.cluster_resources().get("CPU", 1))
    partitions = max(partitions, math.ceil(_count_rows(files) / ROWS_PER_PARTITION))
    buckets = BUCKETS_PER_PARTITION * partitions
    # One block per file, read with pyarrow: read_parquet would start footer-reading actors.
    records = ray.data.from_items([{"path": str(f)} for f in files], override_num_blocks=len(files))
    records = records.map_batches(_read_staging, batch_size=1, batch_format="numpy",
                                  fn_kwargs={"exact": exact, "max_distance": near_distance, "buckets": buckets})
    dropped = records.groupby("bucket", num_partitions=partitions).map_groups(
        _bucket_drops, fn_kwargs={"max_distance": near_distance, "index_digits": index_digits}, batch_format="pyarrow")
    (target,), filesystem = storage.arrow_paths([UPath(drops_dir)])
    dropped.write_parquet(target, filesystem=filesystem, partition_cols=["part"])


def read_part_drops(drops_dir: UPath, part: str) -> dict[str, tuple[str, str]]:
    """key -> (reason, duplicate_of) for one part: exact wins over near, then the smallest duplicate_of."""
    part_dir = drops_dir / f"part={part}"
    if not part_dir.exists():
        return {}
    table = storage.read_parquet(part_dir, partitioning=None)
    # "duplicate_exact" < "duplicate_near"; a key has one exact row but may have a near row per bucket.
    order = pc.sort_indices(table, [("reason", "ascending"), ("duplicate_of", "ascending")])
    drops: dict[str, tuple[str, str]] = {}
    for key, reason, twin in zip(*(table.take(order).column(c).to_pylist() for c in ("key", "reason", "duplicate_of"))):
        drops.setdefault(key, (reason, twin))
    return drops
