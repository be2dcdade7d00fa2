"""The ingest stage: URL list -> downloaded, filtered, deduplicated WebDataset + Parquet shards, on Ray Data.

    1. split     the driver streams the list into parts of `shard_size` rows (keys assigned once, stable)
    2. process   Ray Data workers, one part per call: caption filters, download, header filters, resize, hashes
    3. dedup     a distributed groupby over metadata only (components/data/dedup.py)
    4. write     Ray Data workers, one shard per part: tar + parquet + dropped rows + stats
    5. manifest  the driver sums the per-shard stats (one small JSON each)

Resume: each step leaves markers (parts' _done.json, staging .done files, dedup.done, shard _stats.json), so
killing the job and running it again finishes the dataset with no duplicate and no lost sample.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import ray
from tqdm import tqdm
from upath import UPath

from components import lease, storage
from components.data.dedup import find_duplicates
from components.data.filters import build_filters
from components.data.process_part import PartProcessor, PartSettings, staging_done_marker
from components.data.shard_sets import MANIFEST
from components.data.shards import ShardWriter, stats_file
from components.data.url_list import UrlList, key_digits, listed_rows, split_into_parts
from components.secrets import redacted_text


@dataclass(frozen=True)
class IngestJob:
    url_list: UrlList  # a file, folder or glob, or several (components/data/url_list.py)
    output_dir: UPath  # a local directory or an object-store URL (components/storage.py)
    part_settings: PartSettings
    shard_size: int = 10_000
    shuffle_window: int = 0  # rows the list is shuffled within as it is cut into parts (0: the list's order)
    shuffle_seed: int = 0
    url_col: str = "url"
    caption_col: str = "caption"
    workers: int | None = None  # concurrent part processors; None = one per CPU in the cluster
    dedup_partitions: int | None = None
    keep_staging: bool = False
    dataset_name: str = "dataset"

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"ingest.shard_size must be >= 1, got {self.shard_size}")
        if self.shuffle_window < 0:
            raise ValueError(f"ingest.shuffle_window must be >= 0 (0: no shuffle), got {self.shuffle_window}")
        for name in ("workers", "dedup_partitions"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ingest.{name} must be >= 1 or null, got {value}")


class IngestError(RuntimeError):
    """Ingest cannot go on as configured; the message says why in one line."""


def run_ingest(job: IngestJob, progress: bool = True) -> dict[str, Any]:
    """Run (or finish) the ingest job and return its manifest; one run at a time per output_dir (a lease)."""
    build_filters(job.part_settings.filters)  # fail on a bad filter config before any work starts
    try:
        with lease.held(job.output_dir, "ingest"):
            return _run_ingest(job, progress)
    except lease.LeaseError as error:
        raise IngestError(str(error)) from None


def _run_ingest(job: IngestJob, progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    work = job.output_dir / "_work"
    work.mkdir(parents=True, exist_ok=True)
    storage.remove_stale_temporaries(job.output_dir)
    _check_same_settings(work / "settings.json", job)

    parts = split_into_parts(job.url_list, work / "input", job.shard_size, job.url_col, job.caption_col,
                             job.shuffle_window, job.shuffle_seed)
    staging_dir = work / "staging"
    staging_dir.mkdir(exist_ok=True)
    staging = [staging_dir / p.name for p in parts]
    shard_names = [p.stem.removeprefix("part-") for p in parts]
    shard_done = [stats_file(job.output_dir, name).exists() for name in shard_names]

    timings = {}
    t = time.perf_counter()
    pending = [(str(p), str(s)) for p, s, done in zip(parts, staging, shard_done)
               if not done and not staging_done_marker(s).exists()]
    _process_parts(pending, job, progress)
    timings["process_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    filters = build_filters(job.part_settings.filters)
    dedup_marker = work / "dedup.done"
    if not all(shard_done) and not dedup_marker.exists():
        drops_dir = work / "drops"
        storage.remove_tree(drops_dir)
        _say(progress, "dedup: distributed pass over hashes")
        # Ray Data's default of 200 shuffle partitions is far too many for a small cluster.
        partitions = job.dedup_partitions or 2 * _cluster_cpus()
        find_duplicates(staging, drops_dir, filters.exact_dedup, filters.near_dedup_distance,
                        key_digits(job.shard_size), partitions)
        dedup_marker.touch()
    timings["dedup_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    pending = [str(s) for s, done in zip(staging, shard_done) if not done]
    _write_shards(pending, job, work / "drops", progress)
    timings["write_seconds"] = time.perf_counter() - t

    manifest = _manifest(job, shard_names, listed_rows(work / "input"), filters.reasons(), timings,
                         time.perf_counter() - started)
    storage.write_text(job.output_dir / MANIFEST, json.dumps(manifest, indent=2))
    storage.write_text(job.output_dir / "sizes.json",
                       json.dumps({f"{s['shard']}.tar": s["kept"] for s in manifest["shards"]}))
    if not job.keep_staging:
        storage.remove_tree(staging_dir)
    return manifest


def _process_parts(pending: list[tuple[str, str]], job: IngestJob, progress: bool) -> None:
    if not pending:
        return
    workers = min(len(pending), job.workers or _cluster_cpus())
    items = [{"input": i, "staging": s} for i, s in pending]
    results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        PartProcessor, fn_constructor_kwargs={"settings": job.part_settings},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    bar = tqdm(total=len(items), desc="download+filter parts", unit="part", disable=not progress)
    for row in results.iter_rows():
        bar.update(1)
        bar.set_postfix(ok=f"{row['ok']}/{row['rows']}", refresh=False)
    bar.close()


def _write_shards(pending: list[str], job: IngestJob, drops_dir: UPath, progress: bool) -> None:
    if not pending:
        return
    writer_args = {"drops_dir": str(drops_dir), "output_dir": str(job.output_dir),
                   "encode_format": job.part_settings.image.encode_format}
    workers = min(len(pending), job.workers or _cluster_cpus())
    results = ray.data.from_items([{"staging": s} for s in pending], override_num_blocks=len(pending)).map_batches(
        ShardWriter, fn_constructor_kwargs=writer_args, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    for _ in tqdm(results.iter_rows(), total=len(pending), desc="write shards", unit="shard", disable=not progress):
        pass


def _cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _manifest(job: IngestJob, shard_names: list[str], listed: int, reasons: list[str], timings: dict,
              seconds: float) -> dict:
    """The shards' stats summed, checked against the `listed` rows of the URL list: each shard's kept + dropped
    equals its input by construction, so only that total shows a shard that lost or gained rows."""
    shards = [json.loads(stats_file(job.output_dir, name).read_text()) for name in shard_names]
    dropped: Counter[str] = Counter({reason: 0 for reason in reasons})
    for stats in shards:
        dropped.update(stats["dropped"])
    total_in = sum(s["input"] for s in shards)
    kept = sum(s["kept"] for s in shards)
    if kept + sum(dropped.values()) != total_in:
        raise IngestError(f"accounting broken: kept {kept} + dropped {sum(dropped.values())} != input {total_in}")
    if total_in != listed:
        raise IngestError(f"accounting broken: the shards account for {total_in} input rows, the URL list had {listed}")
    image = job.part_settings.image
    return {
        "dataset": job.dataset_name,
        "url_list": (redacted_text(job.url_list) if isinstance(job.url_list, str)
                     else [redacted_text(entry) for entry in job.url_list]),
        "input_rows": total_in,
        "kept": kept,
        "dropped": dict(dropped),
        "dropped_total": sum(dropped.values()),
        "shards": [{"shard": s["part"], "kept": s["kept"], "input": s["input"]} for s in shards],
        "image": asdict(image),
        "filters": job.part_settings.filters,
        "seconds": seconds,
        "samples_per_second": total_in / seconds if seconds > 0 else None,
        **timings,
    }


# The download settings that decide which rows an ingest keeps (thread_count only changes its speed; the user
# agent names us to X-Robots-Tag directives scoped to an agent).
_OUTCOME_DOWNLOAD_SETTINGS = ("timeout", "retries", "max_bytes", "max_redirects", "allow_networks", "user_agent",
                              "disallowed_header_directives")


def _check_same_settings(path: UPath, job: IngestJob) -> None:
    download = asdict(job.part_settings.download)
    settings = {"image": asdict(job.part_settings.image), "filters": job.part_settings.filters,
                "shard_size": job.shard_size, "download": {k: download[k] for k in _OUTCOME_DOWNLOAD_SETTINGS}}
    if job.shuffle_window:  # (absent when off: the settings of ingests made before the option still match)
        settings["shuffle"] = {"window": job.shuffle_window, "seed": job.shuffle_seed}
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != json.loads(json.dumps(settings)):
            changed = sorted(name for name in settings if previous.get(name) != json.loads(json.dumps(settings[name])))
            raise IngestError(f"{job.output_dir} holds an ingest with other {'/'.join(changed)} settings; "
                              "use a new output_dir or delete it")
    else:
        storage.write_text(path, json.dumps(settings, indent=1))


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def summary(manifest: dict[str, Any], output_dir: UPath) -> str:
    """The one-screen report printed at the end of ingest."""
    lines = [f"ingest of {manifest['dataset']} -> {output_dir}", ""]
    nonzero = {r: n for r, n in manifest["dropped"].items() if n}
    width = max([len(r) for r in nonzero] + [12])
    lines.append(f"  {'kept':<{width}} {manifest['kept']:>9}")
    for reason, count in sorted(nonzero.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {'- ' + reason:<{width}} {count:>9}")
    lines.append("")
    lines.append(f"accounting: input {manifest['input_rows']} = kept {manifest['kept']} "
                 f"+ dropped {manifest['dropped_total']}")
    rate = manifest["samples_per_second"]
    lines.append(f"shards: {len(manifest['shards'])} in {output_dir}   "
                 f"time: {manifest['seconds']:.1f} s ({rate:.0f} input rows/s)")
    return "\n".join(lines)
