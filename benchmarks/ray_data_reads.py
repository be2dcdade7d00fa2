"""Wall time and machine CPU of small Parquet reads on the embedded Ray, with Ray Data's default pool of footer
reader actors (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=32, sized for clusters) against the one actor the pipelines set
on a local Ray (components/runtime.py, EMBEDDED_DATA_ENV).

    python benchmarks/ray_data_reads.py                 # 5 reads of a 6-row file, each way
    python benchmarks/ray_data_reads.py --reads 10 --rows 100000

Each way runs in a fresh process that starts its own Ray (the variable must be set before Ray starts its
workers), reads once to warm up, then times `--reads` reads (read_parquet -> map_batches -> take_all). The
machine's busy CPU over the timed reads comes from /proc/stat (Linux). Results go to
benchmarks/results/ray_data_reads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUT = "benchmarks/results/ray_data_reads.json"


def busy_and_total_ticks() -> tuple[int, int]:
    """The machine's CPU ticks: (busy, all); idle and iowait are the not-busy ones."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def run_one(path: str, reads: int) -> dict:
    """In this process, on an embedded Ray: {"seconds", "busy_fraction"} over `reads` timed reads."""
    import ray

    from components.runtime import init_ray

    init_ray(num_cpus=2 * (os.cpu_count() or 1))  # as the training pipelines and the test session start it

    def read() -> int:
        return len(ray.data.read_parquet(path).map_batches(lambda batch: batch).take_all())

    rows = read()  # Ray Data's own actors (stats, autoscaling coordinator) start on the first read
    busy0, total0 = busy_and_total_ticks()
    start = time.perf_counter()
    for _ in range(reads):
        assert read() == rows
    seconds = time.perf_counter() - start
    busy1, total1 = busy_and_total_ticks()
    return {"seconds": seconds, "busy_fraction": (busy1 - busy0) / max(total1 - total0, 1), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=5)
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one way in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.reads)))
        return

    import pandas as pd

    results = {}
    with tempfile.TemporaryDirectory() as work:
        path = str(Path(work) / "rows.parquet")
        pd.DataFrame({"id": range(args.rows), "text": [f"caption {i}" for i in range(args.rows)]}).to_parquet(path)
        for actors in ("32", "1"):  # Ray Data's default, then ours
            env = {**os.environ, "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": actors}
            done = subprocess.run([sys.executable, __file__, "--one", path, "--reads", str(args.reads)], env=env,
                                  capture_output=True, text=True, check=True)
            results[f"footer_actors_{actors}"] = json.loads(done.stdout.strip().splitlines()[-1])
            result = results[f"footer_actors_{actors}"]
            print(f"{actors:>2} footer actor(s): {args.reads} reads of {args.rows} rows in {result['seconds']:.1f} s, "
                  f"machine busy {result['busy_fraction']:.0%}")
    ratio = results["footer_actors_32"]["seconds"] / results["footer_actors_1"]["seconds"]
    print(f"one actor: {ratio:.1f}x faster")
    report = {"reads": args.reads, "rows": args.rows, "results": results, "speedup": ratio,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    (REPO / OUT).parent.mkdir(parents=True, exist_ok=True)
    (REPO / OUT).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
