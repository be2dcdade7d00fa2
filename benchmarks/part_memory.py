"""Peak memory of one ingest worker against its part's size: stage 1 of ingest (components/data/process_part.py)
downloads every row of one part from a loopback HTTP server serving large JPEGs, checks, resizes and hashes them
and writes the part's staging file, in a fresh process per part size. Reported: that process's peak RSS (VmHWM)
beside its RSS before the part, and the ratio of the largest part's growth to the smallest's.

    python benchmarks/part_memory.py                                  # parts of 1,000, 3,000 and 10,000 rows
    python benchmarks/part_memory.py --sizes 1000 10000 --image-side 2048

Only 127.0.0.1 is contacted (the server this script starts). Writes benchmarks/results/part_memory.json.
"""

from __future__ import annotations

import os

os.environ.update({"DO_NOT_TRACK": "1", "NO_ALBUMENTATIONS_UPDATE": "1"})

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import write_results  # noqa: E402
from components.data.loopback_server import LoopbackServer  # noqa: E402

DISTINCT_IMAGES = 16


def rss_mib(field: str) -> float:
    """VmRSS or VmHWM (the peak) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def photo_like(side: int, seed: int) -> bytes:
    """A JPEG the size of a large web photo: smooth colour fields plus grain (grain keeps it from compressing away)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-24, 25, (side, side, 3), dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def child(part: Path, staging: Path) -> None:
    """One part through process_part in this (fresh) process; prints what it measured as JSON."""
    from upath import UPath

    from components.data.download import DownloadConfig
    from components.data.process_part import ImageSettings, PartProcessor, PartSettings, process_part

    worker = PartProcessor(PartSettings(image=ImageSettings(image_size=256),
                                        download=DownloadConfig(timeout=60, allow_networks=("127.0.0.1/32",))))
    before = rss_mib("VmRSS")
    result = process_part(UPath(part), UPath(staging), worker)
    print(json.dumps({**result, "start_rss_mib": before, "peak_rss_mib": rss_mib("VmHWM")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000], help="rows per part")
    parser.add_argument("--image-side", type=int, default=1536, help="pixels on a side of the served JPEGs")
    parser.add_argument("--child", nargs=2, metavar=("PART", "STAGING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return

    runs = []
    with tempfile.TemporaryDirectory(prefix="clipforge-part-memory-") as scratch:
        served = Path(scratch) / "images"
        served.mkdir()
        bodies = [photo_like(args.image_side, seed) for seed in range(DISTINCT_IMAGES)]
        for i, body in enumerate(bodies):
            (served / f"photo{i}.jpg").write_bytes(body)
        mean_body = sum(map(len, bodies)) / len(bodies)
        print(f"serving {DISTINCT_IMAGES} JPEGs of {args.image_side}x{args.image_side}, "
              f"{mean_body / 2**20:.2f} MiB each on average")
        with LoopbackServer(served) as server:
            for rows in args.sizes:
                part, staging = Path(scratch) / f"part-{rows}.parquet", Path(scratch) / f"staging-{rows}.parquet"
                pq.write_table(pa.table({
                    "key": [f"{i:09d}" for i in range(rows)],
                    "url": [f"{server.base_url}/photo{i % DISTINCT_IMAGES}.jpg?row={i}" for i in range(rows)],
                    "caption": [f"a large photograph, number {i}" for i in range(rows)]}), part)
                started = time.perf_counter()
                done = subprocess.run([sys.executable, __file__, "--child", str(part), str(staging)],
                                      capture_output=True, text=True, check=True)
                measured = json.loads(done.stdout.strip().splitlines()[-1])
                measured.update(seconds_with_start=time.perf_counter() - started,
                                downloaded_mib=rows * mean_body / 2**20)
                runs.append(measured)
                print(f"{rows:>6} rows ({measured['downloaded_mib']:>7.0f} MiB downloaded): kept {measured['ok']}, "
                      f"peak RSS {measured['peak_rss_mib']:.0f} MiB (start {measured['start_rss_mib']:.0f}), "
                      f"{measured['seconds']:.1f} s")
    growth = [r["peak_rss_mib"] - r["start_rss_mib"] for r in runs]
    print(f"growth over the start, largest part / smallest: {growth[-1] / growth[0]:.2f}x "
          f"for {args.sizes[-1] / args.sizes[0]:.0f}x the rows")
    write_results({"machine": platform.platform(), "cpus": os.cpu_count(), "image_side": args.image_side,
                   "mean_body_bytes": mean_body, "runs": runs, "growth_ratio": growth[-1] / growth[0]},
                  REPO / "benchmarks" / "results" / "part_memory.json")


if __name__ == "__main__":
    main()
