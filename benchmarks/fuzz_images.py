"""Fuzz ingest's per-file image checks for a time budget: seeded mutations (bytes flipped, cut out, inserted) of an
image in every accepted format and of files that make Pillow plugins raise, through stage 1 of ingest
(components/data/process_part.process_part: header, truncation check, resize, hashes), as one part after another.

    python benchmarks/fuzz_images.py                           # 60 s, the default ingest.image_formats
    python benchmarks/fuzz_images.py --all-formats             # every Pillow plugin accepted: what they raise

Local bytes only (no network, no Ray). Reported: files, parts, rows by status, decode_error rows by the exception
type in their detail, and the parts that failed: an exception escaping process_part, which must never happen (one
odd file would fail its whole part). Writes benchmarks/results/fuzz_images[_all_formats].json.
"""

from __future__ import annotations

import os

os.environ.update({"DO_NOT_TRACK": "1", "NO_ALBUMENTATIONS_UPDATE": "1"})

import argparse  # noqa: E402
import collections  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402
from upath import UPath  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import write_results  # noqa: E402
from components.data import images  # noqa: E402
from components.data.process_part import ImageSettings, PartProcessor, PartSettings, process_part  # noqa: E402
from tests.helpers import DEFAULT_FILTERS, fuzz_bodies  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    parser.add_argument("--per-seed", type=int, default=50, help="mutations of each seed file per part (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all-formats", action="store_true", help="accept every format Pillow has a plugin for")
    args = parser.parse_args()

    Image.init()
    formats = tuple(sorted(Image.OPEN)) if args.all_formats else images.ACCEPTED_FORMATS
    worker = PartProcessor(PartSettings(image=ImageSettings(image_size=32, formats=formats), filters=DEFAULT_FILTERS))
    statuses, exceptions, failures = collections.Counter(), collections.Counter(), []
    files = parts = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipforge-fuzz-") as scratch:
        part, staging = Path(scratch) / "part-00000.parquet", Path(scratch) / "staging.parquet"
        while time.perf_counter() - started < args.seconds:
            bodies = fuzz_bodies(random.Random(args.seed + parts), args.per_seed)
            pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(len(bodies))], "url": ["local"] * len(bodies),
                                     "caption": ["a file"] * len(bodies), "image": bodies}), part)
            parts, files = parts + 1, files + len(bodies)
            try:
                process_part(UPath(part), UPath(staging), worker)
            except Exception:  # what the benchmark looks for: a file that fails its whole part
                failures.append({"round": parts - 1, "traceback": traceback.format_exc(limit=4)})
                continue
            rows = pq.read_table(staging, columns=["status", "error_message"]).to_pydict()
            statuses.update(rows["status"])
            exceptions.update(detail.split(":", 1)[0] for status, detail in zip(rows["status"], rows["error_message"])
                              if status == "decode_error" and detail)
    seconds = time.perf_counter() - started

    print(f"{files:,} files in {parts} parts, {seconds:.0f} s ({files / seconds:.0f} files/s); "
          f"formats: {'every Pillow plugin' if args.all_formats else ', '.join(formats)}")
    print(f"parts that failed: {len(failures)}\n\n| status | rows |\n|---|---:|")
    for status, count in statuses.most_common():
        print(f"| {status} | {count:,} |")
    print("\n| decode_error: exception or decoder message | rows |\n|---|---:|")
    for name, count in exceptions.most_common(12):
        print(f"| {name[:60]} | {count:,} |")
    name = "fuzz_images_all_formats" if args.all_formats else "fuzz_images"
    write_results({"machine": platform.platform(), "python": platform.python_version(), "formats": list(formats),
                   "seconds": seconds, "files": files, "parts": parts, "statuses": dict(statuses),
                   "decode_errors": dict(exceptions), "failed_parts": failures},
                  REPO / "benchmarks" / "results" / f"{name}.json")


if __name__ == "__main__":
    main()
