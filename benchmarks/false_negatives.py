"""False negatives in the demo's pretraining: shards in list order or shuffled at ingest, CLIP's loss or duplicate
captions as positives.

    python benchmarks/false_negatives.py                  # 3 seeds x 4 variants (~20 min on 2 cores)
    python benchmarks/false_negatives.py --seeds 0 --samples 6400

The built-in corpus draws every concept twice (OpenMoji and Twemoji) under one caption, and its list holds the two
drawings side by side, concepts in category order. Training reads the shards in a shuffled order through a 512-row
buffer, so a batch often holds a caption twice among look-alikes of one category. Two candidate fixes, each alone
and both (the second turns out to change nothing under InfoNCE: components/train/losses.py says why): shards cut from the list in a seeded random order (`ingest.shuffle_window`), and
rows with one caption as each other's positives (`loss.duplicate_positives`). Each run is
`pipelines/pretrain_clip.py` with the demo's settings (the whole corpus, its training concepts, 12,800 samples,
batch 128) and only these settings changed; reported: the held-out check after training (test concepts, both
styles).
Results go to benchmarks/results/false_negatives.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import write_results  # noqa: E402
from benchmarks.versus_open_clip import ensure_shards  # noqa: E402

OUT = "benchmarks/results/false_negatives.json"
SHUFFLE_WINDOW = 100_000  # rows: more than the whole corpus (~3,700), so one permutation
VARIANTS = [(shuffle, duplicates) for shuffle in (False, True) for duplicates in (False, True)]
METRICS = ("image_to_text_R1", "image_to_text_R5", "text_to_image_R1", "text_to_image_R5",
           "image_to_text_mean_rank")


def pretrain(work: Path, shards: Path, seed: int, duplicates: bool, samples: int, env: dict) -> dict[str, float]:
    """One demo pretraining run; its held-out metrics (heldout.* in its MLflow run)."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{work / 'mlflow.db'}"
    if not (work / "model" / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "pipelines" / "pretrain_clip.py"), "data=emoji_local",
                        f"data.output_dir={shards}", f"trainer.samples={samples}", f"trainer.seed={seed}",
                        f"loss.duplicate_positives={str(duplicates).lower()}", f"export_dir={work / 'model'}",
                        f"tokenizer.save_dir={work / 'tokenizer'}", f"trainer.storage_path={work / 'ray'}",
                        "progress=false", f"hydra.run.dir={work / 'hydra'}"],
                       check=True, cwd=work, env={**env, "MLFLOW_TRACKING_URI": store})
    client = MlflowClient(store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'pretrain'")
    return {name: run.data.metrics[f"heldout.{name}"] for name in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=12_800)
    parser.add_argument("--work", type=Path, default=REPO / "data" / "benchmarks" / "false_negatives")
    args = parser.parse_args()
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    args.work.mkdir(parents=True, exist_ok=True)
    shards = {False: ensure_shards(args.work, env),
              True: ensure_shards(args.work, env, "shards-shuffled", f"ingest.shuffle_window={SHUFFLE_WINDOW}")}
    runs = []
    for seed in args.seeds:
        for shuffle, duplicates in VARIANTS:
            name = f"{'shuffled' if shuffle else 'list-order'}-{'duplicates' if duplicates else 'clip'}"
            work = args.work / f"{name}-{args.samples}-seed{seed}"
            work.mkdir(exist_ok=True)
            start = time.time()
            metrics = pretrain(work, shards[shuffle], seed, duplicates, args.samples, env)
            runs.append({"variant": name, "seed": seed, "seconds": time.time() - start, **metrics})
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
    summary = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        chosen = [r for r in runs if r["variant"] == name]
        summary[name] = {k: {"mean": float(np.mean([r[k] for r in chosen])), "min": min(r[k] for r in chosen),
                             "max": max(r[k] for r in chosen)} for k in METRICS}
        print(f"{name:24}" + ", ".join(f"{k} {v['mean']:.3f} ({v['min']:.3f}-{v['max']:.3f})"
                                      for k, v in summary[name].items()))
    write_results({"samples": args.samples, "seeds": args.seeds, "runs": runs, "summary": summary}, REPO / OUT)


if __name__ == "__main__":
    main()
