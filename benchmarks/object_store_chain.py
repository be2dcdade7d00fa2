"""The whole chain on a local disk and in an object store, side by side: what keeping every location in a bucket
costs each stage.

    python benchmarks/object_store_chain.py                  # 300 concepts of the built-in corpus, tiny settings
    python benchmarks/object_store_chain.py --concepts 600

`pipelines/end_to_end.py` (ingest -> pretrain -> evaluate -> AltCLIP -> ClipCap -> caption) runs twice with the
same settings: once with every location under a local directory, once with every location (shards, work_dir
caches, exports, tokenizers, checkpoints, captions, the workflow's state) in a bucket of moto's S3 server on
127.0.0.1 (`pip install -e ".[test]"` installs moto). Then each is run again, which must skip every stage. The
per-stage seconds come from each run's state.json. Loopback moto measures our per-object overhead (uploads
through scratch, listings, many small files), not a real bucket's bandwidth or latency. Results go to
benchmarks/results/object_store_chain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import write_results  # noqa: E402

OUT = "benchmarks/results/object_store_chain.json"
STAGES = ("ingest", "pretrain", "evaluate", "altclip", "clipcap", "caption")


def listed(values: list[str]) -> str:
    return "[" + ",".join(f'"{value}"' for value in values) + "]"


def chain_args(root: str, corpus_dir: Path, concepts: int, scratch: Path) -> list[str]:
    """end_to_end.py arguments that put every location under `root` (a directory or a bucket URL)."""
    outputs = [f"tokenizer.save_dir={root}/tokenizers", f"trainer.storage_path={root}/ray"]
    overrides = {
        "pretrain": ["trainer.samples=1280", "eval_samples=64", *outputs],
        "evaluate": ["tasks=[retrieval,zeroshot_classification]"],
        "altclip": ["stage1.trainer.samples=2560", "stage2.trainer.samples=256", "heldout_pairs=400",
                    "eval_samples=64", *outputs],
        "clipcap": [f"work_dir={root}/clipcap", "lm.trainer.samples=512", "caption.trainer.samples=512",
                    "eval_samples=40", "memorise_samples=20", *outputs],
        "caption": ["generate.method=greedy"],
    }
    data = [f"data.output_dir={root}/shards", f"data.corpus_dir={corpus_dir}", f"data.limit={concepts}"]
    return ["corpus=emoji_local", f"data_overrides={listed(data)}", "progress=false", f"work_dir={root}/workflow",
            *[f"overrides.{stage}={listed(values)}" for stage, values in overrides.items()],
            f"hydra.run.dir={scratch / 'hydra'}"]


def run_chain(args: list[str], tracking_uri: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "end_to_end.py"), *args], cwd=REPO,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"end_to_end.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def measure(name: str, root: str, corpus_dir: Path, concepts: int, scratch: Path) -> dict:
    from upath import UPath

    args = chain_args(root, corpus_dir, concepts, scratch)
    tracking = f"sqlite:///{scratch / 'mlflow.db'}"
    first, _ = run_chain(args, tracking)
    second, output = run_chain(args, tracking)
    skipped = output.count(": unchanged (key")
    state = json.loads((UPath(root) / "workflow" / "state.json").read_text())
    stages = {stage: state[stage]["seconds"] for stage in STAGES}
    print(f"{name}: first run {first:.0f} s, second {second:.0f} s ({skipped} of {len(STAGES)} stages skipped)",
          flush=True)
    return {"root": root, "first_run_s": first, "second_run_s": second, "skipped": skipped, "stages_s": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=300, help="concepts of the built-in corpus (2 images each)")
    options = parser.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    from components.data.emoji_corpus import build_corpus

    with tempfile.TemporaryDirectory(prefix="clipforge-bench-") as tmp:
        tmp = Path(tmp)
        corpus_dir = build_corpus(tmp / "corpus", limit=options.concepts, progress=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
            boto3.client("s3").create_bucket(Bucket="clipforge-bench")
            (tmp / "disk").mkdir()
            (tmp / "bucket").mkdir()
            disk = measure("disk", str(tmp / "disk" / "data"), corpus_dir, options.concepts, tmp / "disk")
            bucket = measure("bucket", "s3://clipforge-bench", corpus_dir, options.concepts, tmp / "bucket")
        finally:
            server.stop()

    print("\n| stage | disk s | bucket s | bucket / disk |\n|---|---:|---:|---:|")
    for stage in STAGES:
        a, b = disk["stages_s"][stage], bucket["stages_s"][stage]
        print(f"| {stage} | {a:.0f} | {b:.0f} | {b / a:.2f}× |")
    print(f"| whole first run | {disk['first_run_s']:.0f} | {bucket['first_run_s']:.0f} | "
          f"{bucket['first_run_s'] / disk['first_run_s']:.2f}× |")
    print(f"| second run (every stage skipped) | {disk['second_run_s']:.0f} | {bucket['second_run_s']:.0f} | "
          f"{bucket['second_run_s'] / disk['second_run_s']:.2f}× |")
    write_results({"concepts": options.concepts, "cpus": os.cpu_count(), "disk": disk, "bucket": bucket}, REPO / OUT)


if __name__ == "__main__":
    main()
