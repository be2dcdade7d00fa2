"""The ingest stage: URL list -> downloaded, filtered, deduplicated WebDataset + Parquet shards, on Ray Data.

    1. split     the driver streams the list into parts of `shard_size` rows (keys assigned once, stable)
    2. process   Ray Data workers, one part per call: caption filters, download, header filters, resize, hashes
    3. dedup     a distributed groupby over metadata only (components/data/dedup.py)
    4. write     Ray Data workers, one shard per part: tar + parquet + dropped rows + stats
    5. manifest  the driver sums the per-shard stats (one small JSON each)

Resume: each step leaves markers (parts' _done.json, staging .done files, dedup.done, shard _stats.json), so
killing the job and running it again finishes the dataset with no duplicate and no lost sample.

Rounds: a dataset grows by rounds, each with its own parts, staging and drop list (the first in _work/, later ones
in _work/rounds/<n>/) and shards numbered on from the rounds before. `append` adds another list's rows;
`retry` gives the rows last dropped for a transient reason (timeout, connection error, HTTP 5xx or 429) another
download, under new keys that name the dropped row they retry (`retry_of`). Either round's rows are deduplicated
against the shards already there, which win. The manifest sums every round:

    input_rows (rows of every list) = kept + dropped, a retried row counted once, by its latest outcome
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import ray
from tqdm import tqdm
from upath import UPath

from components import lease, storage
from components.data.dedup import find_duplicates
from components.data.download import transient_drop
from components.data.filters import build_filters
from components.data.process_part import (
    PartProcessor,
    PartSettings,
    staging_done_marker,
)
from components.data.shard_sets import MANIFEST
from components.data.shards import ShardWriter, stats_file
from components.data.url_list import (
    OWN_COLUMNS,
    PARTS_DONE,
    UrlList,
    cut_into_parts,
    key_digits,
    parts_identity,
    split_into_parts,
)
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
    append: bool = False  # add this list's rows to the dataset already in output_dir
    retry: bool = False  # download the rows last dropped for a transient reason again

    def __post_init__(self):
        for name in ("append", "retry"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ingest.{name} must be true or false, got {getattr(self, name)!r}")
        if self.append and self.retry:
            raise ValueError("ingest.append and ingest.retry are two runs: retry the dataset's failed rows, then "
                             "append a list (or the other way round)")
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


ROUNDS = "rounds"  # _work/rounds/<n>/: the rounds after the first
ROUND_FILE = "round.json"  # a later round's kind, what it retried; written once its parts are cut


@dataclass(frozen=True)
class Round:
    """One input of a dataset: its parts, staging files, drop list and markers live in `work`."""
    work: UPath
    kind: str  # "list" (the first), "append" or "retry"
    retried: dict[str, int]  # a retry: how many rows of each drop reason it downloads again

    @property
    def parts(self) -> list[UPath]:
        return [self.work / "input" / name for name in self.cut_record["parts"]]

    @property
    def listed(self) -> int:
        """Rows of a list this round brought in (a retry brings none: its rows were listed before)."""
        return 0 if self.kind == "retry" else self.cut_record["rows"]

    @property
    def cut_record(self) -> dict:
        """What its parts were cut from (`identity`), the part files and the rows (url_list.PARTS_DONE)."""
        return json.loads((self.work / "input" / PARTS_DONE).read_text())


def _rounds(work: UPath) -> list[Round]:
    """The rounds whose parts are cut, in order."""
    rounds = [Round(work, "list", {})] if (work / "input" / PARTS_DONE).exists() else []
    later = work / ROUNDS
    if later.exists():
        for folder in sorted(later.iterdir(), key=lambda f: int(f.name)):
            if (folder / ROUND_FILE).exists():
                record = json.loads((folder / ROUND_FILE).read_text())
                rounds.append(Round(folder, record["kind"], record.get("retried", {})))
    return rounds


def _run_ingest(job: IngestJob, progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    work = job.output_dir / "_work"
    work.mkdir(parents=True, exist_ok=True)
    storage.remove_stale_temporaries(job.output_dir)
    _check_same_settings(work / "settings.json", job)
    rounds = _rounds(work)
    if not rounds:
        split_into_parts(job.url_list, work / "input", job.shard_size, job.url_col, job.caption_col,
                         job.shuffle_window, job.shuffle_seed)
    elif job.retry:
        _new_retry_round(work, rounds, job, progress)
    else:
        _check_or_append_list(work, rounds, job)
    rounds = _rounds(work)

    timings = dict.fromkeys(("process_seconds", "dedup_seconds", "write_seconds"), 0.0)
    references: list[UPath] = []  # the Parquet companions of the rounds before: their rows win any dedup
    for round_ in rounds:
        shard_names = [p.stem.removeprefix("part-") for p in round_.parts]
        _finish_round(round_, job, references, timings, progress)
        references += [job.output_dir / f"{name}.parquet" for name in shard_names]

    manifest = _manifest(job, rounds, timings, time.perf_counter() - started)
    storage.write_text(job.output_dir / MANIFEST, json.dumps(manifest, indent=2))
    storage.write_text(job.output_dir / "sizes.json",
                       json.dumps({f"{s['shard']}.tar": s["kept"] for s in manifest["shards"]}))
    return manifest


def _finish_round(round_: Round, job: IngestJob, references: list[UPath], timings: dict, progress: bool) -> None:
    """Download, dedup and write whatever of the round's parts has no shard yet (nothing when it is finished)."""
    parts = round_.parts
    staging_dir = round_.work / "staging"
    staging = [staging_dir / p.name for p in parts]
    shard_names = [p.stem.removeprefix("part-") for p in parts]
    shard_done = [stats_file(job.output_dir, name).exists() for name in shard_names]
    if all(shard_done):
        return
    staging_dir.mkdir(exist_ok=True)

    t = time.perf_counter()
    pending = [(str(p), str(s)) for p, s, done in zip(parts, staging, shard_done)
               if not done and not staging_done_marker(s).exists()]
    _process_parts(pending, job, progress)
    timings["process_seconds"] += time.perf_counter() - t

    t = time.perf_counter()
    filters = build_filters(job.part_settings.filters)
    dedup_marker = round_.work / "dedup.done"
    if not dedup_marker.exists():
        drops_dir = round_.work / "drops"
        storage.remove_tree(drops_dir)
        _say(progress, "dedup: distributed pass over hashes" + (f", against {len(references)} shards already there"
                                                                 if references else ""))
        # Ray Data's default of 200 shuffle partitions is far too many for a small cluster.
        partitions = job.dedup_partitions or 2 * _cluster_cpus()
        find_duplicates(staging, drops_dir, filters.exact_dedup, filters.near_dedup_distance,
                        key_digits(job.shard_size), partitions, reference_files=references)
        dedup_marker.touch()
    timings["dedup_seconds"] += time.perf_counter() - t

    t = time.perf_counter()
    _write_shards([str(s) for s, done in zip(staging, shard_done) if not done], job, round_.work / "drops", progress)
    timings["write_seconds"] += time.perf_counter() - t
    if not job.keep_staging:
        storage.remove_tree(staging_dir)


def _next_part(rounds: list[Round]) -> int:
    return max(int(p.stem.removeprefix("part-")) for r in rounds for p in r.parts) + 1


def _new_round_folder(work: UPath, rounds: list[Round]) -> UPath:
    """The next later round's folder, emptied of what a run killed while cutting its parts left there."""
    folder = work / ROUNDS / f"{len(rounds):03d}"
    storage.remove_tree(folder)
    return folder


def _check_or_append_list(work: UPath, rounds: list[Round], job: IngestJob) -> None:
    """Resume the round of this list if there is one; with `append`, else cut it into a new round."""
    identity = parts_identity(job.url_list, job.shard_size, job.url_col, job.caption_col, job.shuffle_window,
                              job.shuffle_seed)
    if any(r.cut_record["identity"] == identity for r in rounds if r.kind != "retry"):
        return
    if not job.append:
        raise IngestError(f"{job.output_dir} holds an ingest of another list (or shard size or shuffle): "
                          "ingest.append=true adds this list's rows to it, a new output_dir starts another dataset")
    folder = _new_round_folder(work, rounds)
    split_into_parts(job.url_list, folder / "input", job.shard_size, job.url_col, job.caption_col,
                     job.shuffle_window, job.shuffle_seed, first_part=_next_part(rounds))
    storage.write_text(folder / ROUND_FILE, json.dumps({"kind": "append"}))


def _new_retry_round(work: UPath, rounds: list[Round], job: IngestJob, progress: bool) -> None:
    """Cut the rows last dropped for a transient reason into a new round, each under a new key with `retry_of`
    naming the dropped row. Nothing when an earlier round is unfinished (it is finished first; retry again after)
    or when no row failed transiently."""
    if not all(stats_file(job.output_dir, p.stem.removeprefix("part-")).exists() for r in rounds for p in r.parts):
        _say(progress, "retry: finishing the dataset's unfinished round first; retry again once it is done")
        return
    retried: Counter[str] = Counter()
    # The row as its list gave it, under a new key: what ingest added (verdicts, hashes, an older retry_of) goes.
    added = {*OWN_COLUMNS, "duplicate_of", "retry_of"} - {"key"}

    def failed_rows():  # streamed drop file by drop file: the driver never holds the whole drop list
        for dropped in _latest_drop_tables(job.output_dir):
            transient = [transient_drop(reason, message) for reason, message in
                         zip(dropped["status"].to_pylist(), dropped["error_message"].to_pylist())]
            failed = dropped.filter(pa.array(transient, pa.bool_()))
            retried.update(failed["status"].to_pylist())
            failed = failed.drop_columns([c for c in failed.column_names if c in added])
            failed = failed.rename_columns(["retry_of" if c == "key" else c for c in failed.column_names])
            yield from failed.to_batches()

    folder = _new_round_folder(work, rounds)
    (folder / "input").mkdir(parents=True)
    parts, total = cut_into_parts(failed_rows(), folder / "input", job.shard_size, _next_part(rounds))
    _say(progress, f"retry: {total} rows dropped for a transient reason get another download")
    if not total:
        storage.remove_tree(folder)  # made above, empty: no round
        return
    storage.write_text(folder / "input" / PARTS_DONE, json.dumps(
        {"identity": {"retry": dict(retried)}, "parts": [p.name for p in parts], "rows": total}))
    storage.write_text(folder / ROUND_FILE, json.dumps({"kind": "retry", "retried": dict(retried)}))


def latest_drops(output_dir: UPath) -> pa.Table:
    """Every dropped row of the dataset (`_dropped/*.parquet`) by its latest outcome: a row that a retry round
    downloaded again (its key is one of that round's `retry_of`) is left out; its new key is kept or dropped anew.
    The whole list in memory: for a look at a dataset's failures (ingest.retry streams it file by file)."""
    tables = list(_latest_drop_tables(output_dir))
    if not tables:
        return pa.table({name: pa.array([], pa.string()) for name in ("key", "status", "error_message")})
    return pa.concat_tables(tables, promote_options="permissive")


def _latest_drop_tables(output_dir: UPath) -> Iterator[pa.Table]:
    """latest_drops, one drop file at a time."""
    retry_parts = [part for r in _rounds(UPath(output_dir) / "_work") if r.kind == "retry" for part in r.parts]
    superseded = {key for part in retry_parts
                  for key in storage.read_parquet(part, columns=["retry_of"])["retry_of"].to_pylist()}
    for file in sorted((UPath(output_dir) / "_dropped").glob("*.parquet"), key=lambda f: f.name):
        dropped = storage.read_parquet(file)
        yield dropped.filter(pa.array([key not in superseded for key in dropped["key"].to_pylist()], pa.bool_()))


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


def _manifest(job: IngestJob, rounds: list[Round], timings: dict, seconds: float) -> dict:
    """The shards' stats summed over every round, checked against the rows the lists had: each shard's kept +
    dropped equals its input by construction, so only the totals show a shard that lost or gained rows. A retried
    row was counted dropped by its first round and again by its retry's: its first drop is taken off."""
    reasons = build_filters(job.part_settings.filters).reasons()
    dropped: Counter[str] = Counter({reason: 0 for reason in reasons})
    shards, summary = [], []
    for number, round_ in enumerate(rounds):
        names = [p.stem.removeprefix("part-") for p in round_.parts]
        stats = [json.loads(stats_file(job.output_dir, name).read_text()) for name in names]
        shards += stats
        for one in stats:
            dropped.update(one["dropped"])
        dropped.subtract(round_.retried)
        summary.append({"round": number, "kind": round_.kind, "input": sum(s["input"] for s in stats),
                        "kept": sum(s["kept"] for s in stats), "shards": names,
                        **({"retried": round_.retried} if round_.kind == "retry" else {})})
    listed = sum(r.listed for r in rounds)
    retried = sum(sum(r.retried.values()) for r in rounds)
    total_in = sum(s["input"] for s in shards)
    kept = sum(s["kept"] for s in shards)
    if kept + sum(dropped.values()) + retried != total_in:
        raise IngestError(f"accounting broken: kept {kept} + dropped {sum(dropped.values())} != input "
                          f"{total_in - retried}")
    if total_in != listed + retried:
        raise IngestError(f"accounting broken: the shards account for {total_in - retried} input rows, the URL "
                          f"list{'s' if len(rounds) > 1 else ''} had {listed}")
    image = job.part_settings.image
    return {
        "dataset": job.dataset_name,
        "url_list": (redacted_text(job.url_list) if isinstance(job.url_list, str)
                     else [redacted_text(entry) for entry in job.url_list]),
        "input_rows": listed,
        "kept": kept,
        "dropped": dict(dropped),
        "dropped_total": sum(dropped.values()),
        "shards": [{"shard": s["part"], "kept": s["kept"], "input": s["input"]} for s in shards],
        "rounds": summary,
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
    retried = sum(sum(r.get("retried", {}).values()) for r in manifest.get("rounds", []))
    lines.append(f"accounting: input {manifest['input_rows']} = kept {manifest['kept']} "
                 f"+ dropped {manifest['dropped_total']}" + (f"  ({retried} rows retried, each counted once)"
                                                             if retried else ""))
    if len(manifest.get("rounds", [])) > 1:
        lines.append("rounds: " + ", ".join(f"{r['kind']} ({r['input']} rows, {r['kept']} kept)"
                                            for r in manifest["rounds"]))
    rate = manifest["samples_per_second"]
    lines.append(f"shards: {len(manifest['shards'])} in {output_dir}   "
                 f"time: {manifest['seconds']:.1f} s ({rate:.0f} input rows/s)")
    return "\n".join(lines)
