"""False negatives in the demo's pretraining: shards in list order or shuffled at ingest, CLIP's loss or duplicate
captions as positives.

    python benchmarks/false_negatives.py                  # 3 seeds x 4 variants (~20 min on 2 cores)
    python benchmarks/false_negatives.py --seeds 0 --samples 6400

The built-in corpus draws every concept twice (OpenMoji and Twemoji) under one caption, and its list holds the two
drawings side by side, concepts in category order. Training reads the shards in a shuffled order through a 512-row
buffer, so a batch often holds a caption twice among look-alikes of one category. Two candidate fixes, each alone
and both (the second turns out to change nothing under InfoNCE: components/train/losses.py says why): shards cut
from the list in a seeded random order (`ingest.shuffle_window`), and rows with one caption as each other's positives
(`loss.duplicate_positives`). Each run is
`pipelines/pretrain_clip.py` with the demo's settings (the whole corpus, its training concepts, 12,800 samples,
batch 128) and only these settings changed; reported: the held-out check after training (test concepts, both
styles).
Results go to benchmarks/results/false_negatives.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.demo_recipe import METRICS, pretrain, summarise  # noqa: E402
from benchmarks.report import write_results  # noqa: E402
from benchmarks.versus_open_clip import ensure_shards  # noqa: E402

OUT = "benchmarks/results/false_negatives.json"
SHUFFLE_WINDOW = 100_000  # rows: more than the whole corpus (~3,700), so one permutation
VARIANTS = [(shuffle, duplicates) for shuffle in (False, True) for duplicates in (False, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=12_800)
    parser.add_argument("--work", type=Path, default=REPO / "data" / "benchmarks" / "false_negatives")
    args = parser.parse_args()
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    args.work.mkdir(parents=True, exist_ok=True)
    # the built-in corpus is shuffled by default now (conf/data/emoji.yaml): list order is asked for
    shards = {False: ensure_shards(args.work, env, "shards", "ingest.shuffle_window=0"),
              True: ensure_shards(args.work, env, "shards-shuffled", f"ingest.shuffle_window={SHUFFLE_WINDOW}")}
    runs = []
    for seed in args.seeds:
        for shuffle, duplicates in VARIANTS:
            name = f"{'shuffled' if shuffle else 'list-order'}-{'duplicates' if duplicates else 'clip'}"
            work = args.work / f"{name}-{args.samples}-seed{seed}"
            work.mkdir(exist_ok=True)
            overrides = [f"trainer.samples={args.samples}", f"loss.duplicate_positives={str(duplicates).lower()}"]
            metrics = pretrain(work, shards[shuffle], seed, overrides, env)
            runs.append({"variant": name, "seed": seed, **metrics})
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
    summary = summarise(runs, (*METRICS, "seconds"))
    write_results({"samples": args.samples, "seeds": args.seeds, "runs": runs, "summary": summary}, REPO / OUT)


if __name__ == "__main__":
    main()
