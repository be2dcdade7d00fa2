"""Ingest throughput: img2dataset alone vs our ingest (every filter on), same images, same loopback server.

    python benchmarks/ingest_throughput.py                      # 5000 URLs, 64 px, 2 processes x 16 threads
    python benchmarks/ingest_throughput.py --urls 20000 --rss-sizes 1000,10000,50000

The built-in emoji corpus (3,740 PNGs of 72 px) is served by one LoopbackServer on 127.0.0.1, in this
process; each contender runs in its own subprocess, so interpreter + library imports + (for us) Ray startup
are inside the measured wall time. URL i points at corpus image i % 3740, copy i // 3740. Copy 0 is the
original file; copy k >= 1 is the image turned by the k-th of the 7 non-identity rotations/flips, saved with
a `bench-copy` PNG text chunk, so the bytes always differ (no exact duplicate) and asymmetric glyphs get a
different pHash (no near duplicate). Symmetric glyphs (a circle, a square) stay near duplicates of their
original, exactly like the visually identical glyphs already inside the corpus: our dedup drops those and
img2dataset keeps them. Therefore the headline rate is over INPUT rows: every row, duplicate or not, is
downloaded, decoded, resized and hashed by both; "ok/s" counts what each writes to its shards.

Memory: the process tree (the subprocess and all its descendants: Ray's gcs_server, raylet, dashboard,
workers) is sampled every SAMPLE_S seconds with psutil; we report the peak of the summed RSS, of the summed
RSS minus shared pages (Ray's object store is shared memory mapped into many processes, and each mapping
counts in each process's RSS), and of the summed PSS (shared pages divided among their users; the honest
total, sampled every PSS_EVERY samples because reading smaps costs CPU).
"""

from __future__ import annotations

import os

# No library phones home: set before anything imports albumentations (via img2dataset), MLflow or Ray.
QUIET = {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
         "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
os.environ.update(QUIET)

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

import pandas as pd  # noqa: E402
import psutil  # noqa: E402
from PIL import Image, PngImagePlugin  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from components.data.emoji_corpus import build_corpus, load_corpus  # noqa: E402
from components.data.loopback_server import LoopbackServer  # noqa: E402
from benchmarks.report import write_results  # noqa: E402
from benchmarks.sampling import PeriodicSampler  # noqa: E402

# ----------------------------------------------------------------------------- knobs
URLS = 5000  # URLs in the head-to-head run
IMAGE_SIZE = 64  # resize target (border mode, jpg q95, for both)
THREADS = 16  # download threads per process / worker
PROCESSES = 2  # img2dataset processes_count = our ingest.workers
RSS_SIZES = "1000,10000"  # URL counts for our ingest's memory-vs-N runs
OUT = "benchmarks/results/ingest.json"
SHARD_SIZE = 1000  # samples per shard, both
MIN_SIDE = 32  # our min_side filter: below the 72 px originals, so it drops nothing but still runs
CORPUS_DIR = REPO / "data" / "emoji_corpus"
SAMPLE_S = 0.2  # RSS sampling period
PSS_EVERY = 5  # read PSS every this many samples (1 s)
RUN_TIMEOUT_S = 3600
# -----------------------------------------------------------------------------

TRANSPOSES = [Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
              Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE,
              Image.Transpose.TRANSVERSE]

IMG2DATASET_DRIVER = """
import json, sys, img2dataset
img2dataset.download(**json.loads(sys.argv[1]))
"""

RAY_STARTUP_DRIVER = """
import json, time
t0 = time.perf_counter()
import ray
from components.runtime import init_ray
t1 = time.perf_counter()
init_ray()
t2 = time.perf_counter()
ray.shutdown()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "init_ray_s": t2 - t1, "shutdown_s": t3 - t2}))
"""


def make_served_tree(corpus_dir: Path, served: Path, n: int) -> pd.DataFrame:
    """Files for n URLs under served/: copy k of corpus image j at c{k}/<image_path>. Returns path, caption."""
    corpus = load_corpus(corpus_dir)
    rows = []
    for i in range(n):
        j, k = i % len(corpus), i // len(corpus)
        image_path, caption = corpus["image_path"][j], corpus["caption"][j]
        target = served / f"c{k}" / image_path
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            if k == 0:
                shutil.copyfile(corpus_dir / image_path, target)
            else:
                with Image.open(corpus_dir / image_path) as image:
                    turned = image.transpose(TRANSPOSES[(k - 1) % len(TRANSPOSES)])
                    info = PngImagePlugin.PngInfo()
                    info.add_text("bench-copy", str(k))  # bytes differ even where the turn changes nothing
                    turned.save(target, format="PNG", pnginfo=info)
        rows.append({"path": f"c{k}/{image_path}", "caption": caption})
    if n > len(corpus) * (len(TRANSPOSES) + 1):
        print(f"note: {n} URLs > {len(corpus) * 8}: copies past the 8th repeat a turn (near duplicates)")
    return pd.DataFrame(rows)


def write_url_list(files: pd.DataFrame, base_url: str, path: Path) -> Path:
    pd.DataFrame({"url": base_url + "/" + files["path"], "caption": files["caption"]}).to_parquet(path, index=False)
    return path


class TreeSampler(PeriodicSampler):
    """Samples RSS (and now and then PSS) of a process and all its descendants on a background thread."""

    def __init__(self, pid: int):
        super().__init__(SAMPLE_S)
        self.root = psutil.Process(pid)
        self.peak = {"rss": 0, "rss_private": 0, "pss": 0, "processes": 0, "largest_process_rss": 0}
        self.largest_name = ""
        self.cpu_seconds: dict[int, float] = {}  # last seen user+system per pid (approximate: misses <0.2 s tails)
        self.tick = 0

    def sample(self) -> bool:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return False
        totals = {"rss": 0, "rss_private": 0, "pss": 0, "processes": 0}
        for proc in procs:
            try:
                mem = proc.memory_info()
                times = proc.cpu_times()
                if self.tick % PSS_EVERY == 0:
                    totals["pss"] += _pss(proc.pid)
                if mem.rss > self.peak["largest_process_rss"]:
                    self.peak["largest_process_rss"], self.largest_name = mem.rss, proc.name()
            except (psutil.Error, OSError):
                continue
            totals["rss"] += mem.rss
            totals["rss_private"] += mem.rss - mem.shared
            totals["processes"] += 1
            self.cpu_seconds[proc.pid] = times.user + times.system
        for name, value in totals.items():
            self.peak[name] = max(self.peak[name], value)
        self.tick += 1
        return True

    def report(self) -> dict:
        mib = {f"peak_{k}_mib": round(v / 2**20, 1) for k, v in self.peak.items() if k != "processes"}
        return {**mib, "peak_processes": self.peak["processes"], "largest_process": self.largest_name,
                "tree_cpu_seconds": round(sum(self.cpu_seconds.values()), 1)}


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def timed_subprocess(cmd: list[str], log: Path, cwd: Path, env: dict) -> dict:
    """Run cmd to completion under a TreeSampler; returns wall seconds, memory peaks and machine CPU use."""
    psutil.cpu_percent(percpu=False)  # start the machine-wide CPU window
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        with TreeSampler(proc.pid) as sampler:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
    wall = time.perf_counter() - started
    machine_cpu = psutil.cpu_percent(percpu=False)
    if code != 0:
        raise RuntimeError(f"{cmd[:3]} exited {code}; last lines:\n" + "\n".join(log.read_text().splitlines()[-30:]))
    return {"wall_s": round(wall, 2), "machine_cpu_percent": machine_cpu, **sampler.report()}


def run_img2dataset(url_list: Path, work: Path, args, env: dict) -> dict:
    out = work / "img2dataset_out"
    options = dict(url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
                   output_format="webdataset", output_folder=str(out), image_size=args.image_size,
                   resize_mode="border", encode_format="jpg", encode_quality=95,
                   processes_count=args.processes, thread_count=args.threads, number_sample_per_shard=SHARD_SIZE,
                   distributor="multiprocessing", timeout=10, retries=0, enable_wandb=False)
    result = timed_subprocess([sys.executable, "-c", IMG2DATASET_DRIVER, json.dumps(options)],
                              work / "img2dataset.log", work, env)
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    result["input_rows"] = sum(s["count"] for s in stats)
    result["ok"] = sum(s["successes"] for s in stats)
    result["failed"] = sum(s["failed_to_download"] + s["failed_to_resize"] for s in stats)
    return result


def run_ours(url_list: Path, work: Path, name: str, args, env: dict) -> dict:
    out = work / f"{name}_out"
    run_dir = work / f"{name}_run"  # cwd of the pipeline: Hydra's run dir and MLflow's artifacts land here
    run_dir.mkdir()
    filters = ["caption_length", "caption_words", "language", "max_pixels", "min_side", "max_aspect_ratio",
               "exact_dedup", "near_dedup"]
    cmd = [sys.executable, str(REPO / "pipelines" / "ingest.py"),
           "data=url_list", f"data.url_list={url_list}", f"data.output_dir={out}", f"data.image_size={args.image_size}",
           "data.allow_networks=['127.0.0.1/32']",
           f"ingest.shard_size={SHARD_SIZE}", f"ingest.workers={args.processes}",
           f"ingest.download.thread_count={args.threads}", "ingest.resize_mode=border",
           "ingest.encode_format=jpg", "ingest.encode_quality=95",
           *[f"filters.{f}.enabled=true" for f in filters], f"filters.min_side.min_side={MIN_SIDE}",
           "filters.model_score.enabled=false",
           "progress=false", f"mlflow.run_name=bench-{name}", f"hydra.run.dir={run_dir / 'hydra'}"]
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    result = timed_subprocess(cmd, work / f"{name}.log", run_dir, env)
    manifest = json.loads((out / "_manifest.json").read_text())
    dropped = {reason: n for reason, n in manifest["dropped"].items() if n}
    dedup_drops = dropped.get("duplicate_exact", 0) + dropped.get("duplicate_near", 0)
    result.update(input_rows=manifest["input_rows"], ok=manifest["kept"], ok_before_dedup=manifest["kept"] + dedup_drops,
                  dropped=dropped, run_ingest_s=round(manifest["seconds"], 2),
                  process_s=round(manifest["process_seconds"], 2), dedup_s=round(manifest["dedup_seconds"], 2),
                  write_s=round(manifest["write_seconds"], 2))
    result["outside_run_ingest_s"] = round(result["wall_s"] - manifest["seconds"], 2)
    result["ray_data"] = ray_data_timeline(work / f"{name}.log")
    return result


def ray_data_timeline(pipeline_log: Path) -> list[dict]:
    """Per Ray Data execution (process, dedup, write): seconds until its first task ran, and in all.

    Read from Ray's own debug logs (the session directory is named in the pipeline's output), so the
    profile costs the run nothing. `footer_actors`: actors Ray Data's Parquet reader started for the read.
    """
    found = re.search(r"Full logs are in (\S+)", pipeline_log.read_text())
    if not found:
        return []
    stamp = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
    timeline = []
    for log in Path(found.group(1)).glob("ray-data-dataset_*.log"):
        text = log.read_text(errors="replace")
        times = {}
        for key, pattern in (("start", "Starting execution of Dataset"), ("first_task", "Executing map task"),
                             ("end", "execution finished in")):
            hit = re.search(stamp + r".*" + pattern, text, re.MULTILINE)
            if hit:
                times[key] = time.mktime(time.strptime(hit.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + int(hit.group(1)[20:]) / 1000
        plan = re.search(r"Execution plan of Dataset \S+: (.*)", text)
        operators = re.findall(r"\[(\w+)\(?(\w*)", plan.group(1)) if plan else []
        if "start" not in times or "end" not in times:
            continue
        timeline.append({
            "stage": next((fn for _, fn in operators if fn in ("PartProcessor", "ShardWriter")), "dedup"),
            "start": times["start"],
            "until_first_task_s": round(times.get("first_task", times["end"]) - times["start"], 1),
            "total_s": round(times["end"] - times["start"], 1),
            "footer_actors": sum(int(n) for n in re.findall(r"Provisioned (\d+) FooterReader actors", text)),
        })
    timeline.sort(key=lambda t: t["start"])
    return [{k: v for k, v in t.items() if k != "start"} for t in timeline]


def rates(result: dict, cores: int) -> dict:
    wall = result["wall_s"]
    return {"rows_per_s": round(result["input_rows"] / wall, 1), "ok_per_s": round(result["ok"] / wall, 1),
            "rows_per_s_per_core": round(result["input_rows"] / wall / cores, 1)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "cpu": cpu,
            "python": platform.python_version(), "ray": version("ray"), "img2dataset": version("img2dataset")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--urls", type=int, default=URLS)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--processes", type=int, default=PROCESSES)
    parser.add_argument("--rss-sizes", default=RSS_SIZES, help="comma-separated URL counts; empty to skip")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    args = parser.parse_args()
    rss_sizes = [int(s) for s in args.rss_sizes.split(",") if s.strip()]
    cores = os.cpu_count()
    env = {**os.environ, **QUIET, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    build_corpus(CORPUS_DIR, progress=False)
    work = Path(tempfile.mkdtemp(prefix="clipforge-ingest-bench-"))
    results: dict = {"machine": machine(), "settings": {**vars(args), "shard_size": SHARD_SIZE, "min_side": MIN_SIDE}}
    try:
        files = make_served_tree(CORPUS_DIR, work / "served", max([args.urls, *rss_sizes]))
        with LoopbackServer(work / "served", host="127.0.0.1") as server:
            head = write_url_list(files.head(args.urls), server.base_url, work / f"urls_{args.urls}.parquet")

            print(f"[1/4] img2dataset, {args.urls} URLs ...", flush=True)
            a = run_img2dataset(head, work, args, env)
            a.update(rates(a, cores))
            print(f"[2/4] our ingest, {args.urls} URLs ...", flush=True)
            b = run_ours(head, work, f"ours_{args.urls}", args, env)
            b.update(rates(b, cores))
            print("[3/4] Ray startup alone ...", flush=True)
            startup = json.loads(subprocess.run([sys.executable, "-c", RAY_STARTUP_DRIVER], env=env, cwd=work,
                                                capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            memory = {}
            for n in rss_sizes:
                print(f"[4/4] our ingest, {n} URLs (memory vs N) ...", flush=True)
                url_list = write_url_list(files.head(n), server.base_url, work / f"urls_{n}.parquet")
                memory[n] = run_ours(url_list, work, f"ours_{n}", args, env)
                memory[n].update(rates(memory[n], cores))
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    ratio = b["rows_per_s"] / a["rows_per_s"]
    steady = b["input_rows"] / b["run_ingest_s"]
    results.update(img2dataset=a, ours=b, ray_startup=startup, memory_vs_n=memory,
                   ratio_rows_per_s=round(ratio, 3), ratio_ok_per_s=round(b["ok_per_s"] / a["ok_per_s"], 3),
                   ours_run_ingest_rows_per_s=round(steady, 1),
                   ratio_run_ingest_vs_img2dataset=round(steady / a["rows_per_s"], 3))

    print(f"\n{args.urls} URLs, {args.image_size} px, {args.processes} processes x {args.threads} threads, "
          f"{cores} cores\n")
    print(f"{'':14} {'wall s':>7} {'rows/s':>7} {'ok/s':>7} {'rows/s/core':>11} {'ok':>6} "
          f"{'peak RSS MiB':>12} {'RSS-shared':>10} {'PSS MiB':>8} {'procs':>5} {'CPU s':>6}")
    for name, r in (("img2dataset", a), ("ours", b)):
        print(f"{name:14} {r['wall_s']:7.1f} {r['rows_per_s']:7.1f} {r['ok_per_s']:7.1f} {r['rows_per_s_per_core']:11.1f} "
              f"{r['ok']:6d} {r['peak_rss_mib']:12.0f} {r['peak_rss_private_mib']:10.0f} {r['peak_pss_mib']:8.0f} "
              f"{r['peak_processes']:5d} {r['tree_cpu_seconds']:6.0f}")
    print(f"\nours / img2dataset (input rows/s, end to end): {ratio:.2f}x   (goal >= 0.90x)")
    print(f"ours inside run_ingest only: {steady:.1f} rows/s = {steady / a['rows_per_s']:.2f}x img2dataset's end-to-end rate")
    print(f"ours breakdown: process {b['process_s']} s, dedup {b['dedup_s']} s, write {b['write_s']} s, "
          f"outside run_ingest (imports, Ray start, MLflow, sample grid, exit) {b['outside_run_ingest_s']} s; "
          f"Ray alone: import {startup['import_s']:.1f} s + init {startup['init_ray_s']:.1f} s + "
          f"shutdown {startup['shutdown_s']:.1f} s")
    print(f"ours dropped: {b['dropped']}")
    for t in b["ray_data"]:
        print(f"  Ray Data {t['stage']:>13}: {t['total_s']:5.1f} s, of which {t['until_first_task_s']:4.1f} s before its "
              f"first task ran; Parquet footer-reader actors started: {t['footer_actors']}")
    if memory:
        print(f"\n{'our ingest':14} {'wall s':>7} {'rows/s':>7} {'peak RSS MiB':>12} {'RSS-shared':>10} {'PSS MiB':>8} "
              f"{'largest proc MiB':>16}")
        for n, r in memory.items():
            print(f"{str(n) + ' URLs':14} {r['wall_s']:7.1f} {r['rows_per_s']:7.1f} {r['peak_rss_mib']:12.0f} "
                  f"{r['peak_rss_private_mib']:10.0f} {r['peak_pss_mib']:8.0f} {r['peak_largest_process_rss_mib']:16.0f}")
    write_results(results, args.out)


if __name__ == "__main__":
    main()
