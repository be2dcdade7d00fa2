"""Dedup scaling: components/data/dedup.find_duplicates on synthetic metadata-only staging files.

    python benchmarks/dedup_scale.py                       # 100k and 1M rows, 10 min limit per size
    python benchmarks/dedup_scale.py --sizes 20000,200000 --timeout 1800

Each size gets staging files like ingest's (`part-00000.parquet`, 10k rows each, columns key/status/sha256/
phash, no images; keys f"{part:05d}{index:04d}" as url_list.make_key gives for 10k-row parts). Rows are
random 64-bit pHashes and random sha256s, with planted duplicates: EXACT_FRACTION of rows copy an earlier
original's sha256 and pHash, NEAR_FRACTION copy an earlier original's pHash with 1 or 2 bits flipped. Every
planted row has a larger key than its original, so the right drop list is exactly the planted rows.

Each size runs in a fresh subprocess that starts Ray with components.runtime.init_ray and times only
find_duplicates (Ray startup is reported apart). This process samples the subprocess tree every SAMPLE_S s
with psutil: the driver's RSS, and per Ray worker process (process title "ray::...") its RSS and RSS minus
shared pages (Ray's object store is shared memory and counts in the RSS of every worker that maps it).
A size that passes --timeout is stopped; its partial progress is read from Ray Data's log.
Then the drop list is checked: recall of the planted rows, every reported twin is a true twin, and a
sample of kept and dropped rows is checked by brute force against all rows.
"""

from __future__ import annotations

import os

os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "DO_NOT_TRACK": "1", "NO_ALBUMENTATIONS_UPDATE": "1"})

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import write_results  # noqa: E402
from benchmarks.sampling import PeriodicSampler  # noqa: E402

# ----------------------------------------------------------------------------- knobs
SIZES = "100000,1000000"
PROBE_ROWS = 10_000  # one small run first: the fixed cost of the pass (0: skip)
ROWS_PER_FILE = 10_000
EXACT_FRACTION = 0.01  # planted exact duplicates (same sha256 and pHash as an earlier row)
NEAR_FRACTION = 0.01  # planted near duplicates (pHash of an earlier row with 1-2 bits flipped)
MAX_DISTANCE = 2  # near_dedup.max_distance, as in conf/filters/default.yaml
PARTITIONS = None  # shuffle partitions; None: 2 x CPUs, as ingest does
TIMEOUT_S = 600  # per size
VERIFY_SAMPLE = 300  # kept and dropped rows each checked by brute force
SAMPLE_S = 0.2
SEED = 0
OUT = "benchmarks/results/dedup.json"
# -----------------------------------------------------------------------------


def make_dataset(n: int, out_dir: Path, rng: np.random.Generator) -> dict:
    """Write the staging files; return the truth: pHashes, sha256s and the planted rows by kind."""
    phash = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64, endpoint=True)
    raw = rng.bytes(32 * n)
    sha = np.array([raw[i:i + 32].hex() for i in range(0, 32 * n, 32)], dtype=object)
    n_exact, n_near = int(n * EXACT_FRACTION), int(n * NEAR_FRACTION)
    targets = rng.choice(np.arange(1, n), n_exact + n_near, replace=False)
    planted = np.zeros(n, bool)
    planted[targets] = True
    sources = rng.integers(0, targets)  # an earlier row...
    while (redo := planted[sources]).any():  # ...that is an original itself
        sources[redo] = rng.integers(0, targets[redo])
    exact_t, exact_s = targets[:n_exact], sources[:n_exact]
    near_t, near_s = targets[n_exact:], sources[n_exact:]
    sha[exact_t] = sha[exact_s]
    phash[exact_t] = phash[exact_s]
    flips = np.zeros(n_near, np.uint64)
    for i, bits in enumerate(rng.integers(1, MAX_DISTANCE + 1, n_near)):
        for bit in rng.choice(64, bits, replace=False):
            flips[i] |= np.uint64(1) << np.uint64(bit)
    phash[near_t] = (phash[near_s].view(np.uint64) ^ flips).view(np.int64)

    out_dir.mkdir(parents=True)
    files = []
    for part, start in enumerate(range(0, n, ROWS_PER_FILE)):
        stop = min(start + ROWS_PER_FILE, n)
        table = pa.table({"key": [f"{part:05d}{i:04d}" for i in range(stop - start)], "status": ["ok"] * (stop - start),
                          "sha256": pa.array(sha[start:stop], pa.string()), "phash": pa.array(phash[start:stop], pa.int64())})
        files.append(out_dir / f"part-{part:05d}.parquet")
        pq.write_table(table, files[-1])
    return {"phash": phash, "sha": sha, "exact": exact_t, "near": near_t, "files": files}


def row_of(keys: pd.Series) -> np.ndarray:
    return keys.str.slice(0, 5).astype(int).to_numpy() * ROWS_PER_FILE + keys.str.slice(5).astype(int).to_numpy()


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b).view(np.uint64))


def verify(truth: dict, drops_dir: Path, rng: np.random.Generator) -> dict:
    """Recall of the planted rows, validity of every reported twin, brute-force check of a sample."""
    n, phash, sha = len(truth["phash"]), truth["phash"], truth["sha"]
    frames = [pq.read_table(f).to_pandas() for f in drops_dir.rglob("*.parquet")]
    drops = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["key", "reason", "duplicate_of"])
    row, twin = row_of(drops["key"]), row_of(drops["duplicate_of"])
    exact, near = drops["reason"].to_numpy() == "duplicate_exact", drops["reason"].to_numpy() == "duplicate_near"
    dropped = np.zeros(n, bool)
    dropped[row] = True
    planted = np.zeros(n, bool)
    planted[truth["exact"]] = planted[truth["near"]] = True
    twin_ok = (twin < row) & np.where(exact, sha[twin] == sha[row], distance(phash[twin], phash[row]) <= MAX_DISTANCE)

    first_with_sha = {}
    for i, value in enumerate(sha):
        first_with_sha.setdefault(value, i)

    def has_earlier_twin(i: int) -> bool:  # brute force: every earlier row's pHash
        return first_with_sha[sha[i]] < i or bool((distance(phash[:i], phash[i]) <= MAX_DISTANCE).any())

    kept_sample = rng.choice(np.flatnonzero(~dropped), min(VERIFY_SAMPLE, int((~dropped).sum())), replace=False)
    dropped_sample = rng.choice(np.flatnonzero(dropped), min(VERIFY_SAMPLE, int(dropped.sum())), replace=False)
    return {
        "planted_exact": len(truth["exact"]), "planted_near": len(truth["near"]),
        "recall_exact": float(np.isin(truth["exact"], row[exact]).mean()),
        "recall_near": float(np.isin(truth["near"], row[near]).mean()),
        "dropped_rows": int(dropped.sum()),
        "dropped_not_planted": int((dropped & ~planted).sum()),
        "twins_invalid": int((~twin_ok).sum()),
        "brute_force_kept_with_twin": int(sum(has_earlier_twin(i) for i in kept_sample)),
        "brute_force_dropped_without_twin": int(sum(not has_earlier_twin(i) for i in dropped_sample)),
        "brute_force_sample": [len(kept_sample), len(dropped_sample)],
    }


class WorkerSampler(PeriodicSampler):
    """Peak RSS of the driver (the subprocess), of each Ray worker process, and of the whole tree."""

    def __init__(self, pid: int):
        super().__init__(SAMPLE_S)
        self.root = psutil.Process(pid)
        self.peak = {"driver_rss": 0, "worker_rss": 0, "worker_rss_private": 0, "tree_rss": 0, "workers": 0}
        self.largest_worker = ""

    def sample(self) -> bool:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return False
        tree, workers = 0, 0
        for proc in procs:
            try:
                mem = proc.memory_info()
                title = " ".join(proc.cmdline())[:80]
            except (psutil.Error, OSError):
                continue
            tree += mem.rss
            if proc.pid == self.root.pid:
                self.peak["driver_rss"] = max(self.peak["driver_rss"], mem.rss)
            elif title.startswith("ray::"):
                workers += 1
                if mem.rss > self.peak["worker_rss"]:
                    self.peak["worker_rss"], self.largest_worker = mem.rss, title
                self.peak["worker_rss_private"] = max(self.peak["worker_rss_private"], mem.rss - mem.shared)
        self.peak["tree_rss"] = max(self.peak["tree_rss"], tree)
        self.peak["workers"] = max(self.peak["workers"], workers)
        return True

    def report(self) -> dict:
        out = {f"peak_{k}_mib": round(v / 2**20, 1) for k, v in self.peak.items() if k != "workers"}
        return {**out, "peak_worker_processes": self.peak["workers"], "largest_worker": self.largest_worker}


def run_child(staging: Path, drops: Path, log: Path, timeout: float) -> dict:
    """find_duplicates in a fresh process with its own local Ray; stopped (whole tree) after `timeout`."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(staging), str(drops)]
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        with WorkerSampler(proc.pid) as sampler:
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
                for p in tree:  # only the processes this run started, by pid
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
                proc.wait()
    result = {"wall_s": round(time.perf_counter() - started, 1), "timed_out": timed_out, **sampler.report()}
    text = log.read_text(errors="replace")
    timing = re.search(r"^DEDUP_TIMING (.*)$", text, re.MULTILINE)
    if timing:
        result.update(json.loads(timing.group(1)))
    elif not timed_out:
        raise RuntimeError("dedup child failed:\n" + "\n".join(text.splitlines()[-30:]))
    if timed_out:
        result["progress_at_stop"] = ray_data_progress(text)
    return result


def ray_data_progress(child_log: str) -> list[str]:
    """The last per-operator progress lines Ray Data wrote before the run was stopped."""
    found = re.search(r"Full logs are in (\S+)", child_log)
    if not found:
        return []
    lines = []
    for log in Path(found.group(1)).glob("ray-data-dataset_*.log"):
        progress = re.findall(r"streaming_executor.py:\d+ -- (\d+: .*)", log.read_text(errors="replace"))
        operators = {}
        for line in progress:  # keep the last line seen for each operator
            operators[line.split(":", 1)[0]] = re.sub(r", alloc=.*?(?=, Blocks|$)|\(in=.*?\)", "", line)[:200]
        lines += list(operators.values())
    return lines


def child(staging: Path, drops: Path) -> None:
    t0 = time.perf_counter()
    import ray

    from components.data.dedup import BUCKETS_PER_PARTITION, ROWS_PER_PARTITION, find_duplicates
    from components.runtime import init_ray
    t1 = time.perf_counter()
    init_ray()
    t2 = time.perf_counter()
    partitions = PARTITIONS or 2 * int(ray.cluster_resources()["CPU"])
    # What find_duplicates derives: shuffle partitions grow with the rows, BUCKETS_PER_PARTITION buckets each.
    shuffle = max(partitions, -(-sum(pq.read_metadata(f).num_rows for f in staging.glob("part-*.parquet"))
                                // ROWS_PER_PARTITION))
    find_duplicates(sorted(staging.glob("part-*.parquet")), drops, True, MAX_DISTANCE, partitions)
    t3 = time.perf_counter()
    print("DEDUP_TIMING " + json.dumps({"import_s": round(t1 - t0, 2), "init_ray_s": round(t2 - t1, 2),
                                        "dedup_s": round(t3 - t2, 2), "partitions": shuffle,
                                        "buckets": shuffle * BUCKETS_PER_PARTITION}), flush=True)


def bucket_cost(rows: int, rng: np.random.Generator) -> dict:
    """In-process cost of the dedup pass's vectorised parts, without Ray: turning staging rows into exact and
    band records (_records) and one bucket holding all of them (_bucket_drops), in microseconds per staging row."""
    from components.data.dedup import _bucket_drops, _records

    table = pa.table({
        "key": [f"{i // ROWS_PER_FILE:05d}{i % ROWS_PER_FILE:04d}" for i in range(rows)], "status": ["ok"] * rows,
        "sha256": [bytes(r).hex() for r in rng.integers(0, 256, (rows, 32), dtype=np.uint8)],
        "phash": rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, rows, dtype=np.int64)})
    started = time.perf_counter()
    records = _records(table, True, MAX_DISTANCE, 1)
    records_s = time.perf_counter() - started
    started = time.perf_counter()
    _bucket_drops(records, MAX_DISTANCE)
    bucket_s = time.perf_counter() - started
    return {"rows": rows, "records_us_per_row": round(records_s / rows * 1e6, 2),
            "bucket_us_per_row": round(bucket_s / rows * 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=SIZES)
    parser.add_argument("--probe-rows", type=int, default=PROBE_ROWS)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per size")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--child", nargs=2, metavar=("STAGING", "DROPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(Path(args.child[0]), Path(args.child[1]))

    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(SEED)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    results = {"machine": {"cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                           "cpu": cpu, "python": platform.python_version(), "ray": version("ray")},
               "settings": {"rows_per_file": ROWS_PER_FILE, "exact_fraction": EXACT_FRACTION,
                            "near_fraction": NEAR_FRACTION, "max_distance": MAX_DISTANCE, "timeout_s": args.timeout},
               "bucket_cost": bucket_cost(ROWS_PER_FILE * 5, rng), "runs": {}}
    work = Path(tempfile.mkdtemp(prefix="clipforge-dedup-bench-"))
    try:
        for n in ([args.probe_rows] if args.probe_rows else []) + sizes:
            print(f"{n} rows: writing staging files ...", flush=True)
            truth = make_dataset(n, work / f"staging_{n}", rng)
            print(f"{n} rows: find_duplicates ...", flush=True)
            run = run_child(work / f"staging_{n}", work / f"drops_{n}", work / f"child_{n}.log", args.timeout)
            if not run["timed_out"]:
                run["check"] = verify(truth, work / f"drops_{n}", rng)
            results["runs"][n] = run
            print(json.dumps(run, indent=1), flush=True)
            shutil.rmtree(work / f"staging_{n}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    runs = results["runs"]
    print(f"\n{'rows':>9} {'dedup s':>8} {'rows/s':>8} {'driver MiB':>10} {'max worker MiB':>14} "
          f"{'worker private':>14} {'tree MiB':>9} {'recall ex/near':>14} {'false drops':>11}")
    for n, r in runs.items():
        seconds = r.get("dedup_s")
        check = r.get("check", {})
        shown = f"{seconds:8.1f}" if seconds else f">{r['wall_s']:7.0f}"
        rate = f"{n / seconds:8.0f}" if seconds else f"<{n / r['wall_s']:7.0f}"
        recall = f"{check['recall_exact']:.3f}/{check['recall_near']:.3f}" if check else "-"
        false = str(check["dropped_not_planted"]) if check else "-"
        print(f"{n:>9} {shown} {rate} {r['peak_driver_rss_mib']:10.0f} {r['peak_worker_rss_mib']:14.0f} "
              f"{r['peak_worker_rss_private_mib']:14.0f} {r['peak_tree_rss_mib']:9.0f} {recall:>14} {false:>11}")
    if len(sizes) >= 2 and all(runs[s].get("dedup_s") for s in sizes[:2]):
        small, big = sizes[0], sizes[1]
        ratio = runs[big]["dedup_s"] / runs[small]["dedup_s"]
        results["time_ratio"] = round(ratio, 2)
        print(f"\ntime {big}/{small}: {ratio:.1f}x for {big / small:.0f}x the rows (near-linear: ~{big / small:.0f}x)")
    cost = results["bucket_cost"]
    print(f"in-process kernel, {cost['rows']} rows in one bucket: records {cost['records_us_per_row']} us/row, "
          f"bucket dedup {cost['bucket_us_per_row']} us/row")
    write_results(results, args.out)


if __name__ == "__main__":
    main()
