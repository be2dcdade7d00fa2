"""The demo's pretraining recipe: which settings reach the most held-out retrieval in about the same time.

    python benchmarks/demo_recipe.py                                   # every variant, 3 seeds (~2 h on 2 cores)
    python benchmarks/demo_recipe.py --variants "12,800 samples" "lr 2e-3" --seeds 0
    python benchmarks/demo_recipe.py --variant "mine=trainer.lr=0.002,trainer.augment=null"

Each run is `pipelines/pretrain_clip.py` as the demo runs it (the whole built-in corpus shuffled into its shards,
its training concepts, `tiny` CLIP, 2 workers, ZeRO-2) with one variant's overrides; reported per variant: the
held-out check after training (753 images of the test concepts, both styles, against their 390 captions; chance
R@5 0.013) and the run's wall time, mean and range over seeds. Results go to benchmarks/results/demo_recipe.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import write_results  # noqa: E402
from benchmarks.versus_open_clip import ensure_shards  # noqa: E402

OUT = "benchmarks/results/demo_recipe.json"
METRICS = ("image_to_text_R1", "image_to_text_R5", "text_to_image_R1", "text_to_image_R5",
           "image_to_text_mean_rank")
# One knob at a time at the old default's 12,800 samples (100 steps), then longer runs; the default is 38,400.
OLD_BUDGET = "trainer.samples=12800"
VARIANTS = {
    "12,800 samples": [OLD_BUDGET],
    "lr 2e-3": [OLD_BUDGET, "trainer.lr=0.002"],
    "lr 3e-3": [OLD_BUDGET, "trainer.lr=0.003"],
    "crop scale 0.8-1.0": [OLD_BUDGET, "trainer.augment.scale=[0.8,1.0]"],
    "no augmentation": [OLD_BUDGET, "trainer.augment=null"],
    "batch 64": [OLD_BUDGET, "trainer.global_batch=64"],
    "warmup 3%": [OLD_BUDGET, "trainer.warmup_fraction=0.03"],
    "weight decay 0.2": [OLD_BUDGET, "trainer.weight_decay=0.2"],
    "temperature 0.03": [OLD_BUDGET, "model.temperature_init=0.03"],
    "tokenizer 1,024": [OLD_BUDGET, "tokenizer.vocab_size=1024"],
    "tokenizer 16,384": [OLD_BUDGET, "tokenizer.vocab_size=16384"],
    "25,600 samples": ["trainer.samples=25600"],
    "38,400 samples (the default)": [],
}


def pretrain(work: Path, shards: Path, seed: int, overrides: list[str], env: dict) -> dict[str, float]:
    """One demo pretraining run with these overrides: its held-out metrics (heldout.* in its MLflow run) and wall
    seconds."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{work / 'mlflow.db'}"
    timing = work / "seconds.txt"  # the whole run's wall time (Ray start to registration), kept for a re-run
    if not (work / "model" / "config.json").exists():
        start = time.time()
        subprocess.run([sys.executable, str(REPO / "pipelines" / "pretrain_clip.py"), "data=emoji_local",
                        f"data.output_dir={shards}", f"trainer.seed={seed}", f"export_dir={work / 'model'}",
                        f"tokenizer.save_dir={work / 'tokenizer'}", f"trainer.storage_path={work / 'ray'}",
                        "progress=false", f"hydra.run.dir={work / 'hydra'}", *overrides],
                       check=True, cwd=work, env={**env, "MLFLOW_TRACKING_URI": store})
        timing.write_text(f"{time.time() - start:.1f}\n")
    client = MlflowClient(store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'pretrain'")
    return {**{name: run.data.metrics[f"heldout.{name}"] for name in METRICS}, "seconds": float(timing.read_text())}


def summarise(runs: list[dict], keys: tuple[str, ...]) -> dict[str, dict]:
    """Per variant (in the order run): mean, min and max of each key over its seeds."""
    summary = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        chosen = [r for r in runs if r["variant"] == name]
        summary[name] = {k: {"mean": float(np.mean([r[k] for r in chosen])), "min": min(r[k] for r in chosen),
                             "max": max(r[k] for r in chosen)} for k in keys}
        print(f"{name:24}" + ", ".join(f"{k} {v['mean']:.3f} ({v['min']:.3f}-{v['max']:.3f})"
                                      for k, v in summary[name].items()), flush=True)
    return summary


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not overrides:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=OVERRIDE[,OVERRIDE...]")
    return name, re.split(r",(?![^\[]*\])", overrides)  # not the commas of a list value: scale=[0.8,1.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                        help=f"built-in variants to run (default: all): {', '.join(VARIANTS)}")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME=OVERRIDES",
                        help="an extra variant: a name and comma-separated Hydra overrides")
    parser.add_argument("--work", type=Path, default=REPO / "data" / "benchmarks" / "demo_recipe")
    args = parser.parse_args()
    variants = {**{name: VARIANTS[name] for name in args.variants}, **dict(args.variant)}
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    args.work.mkdir(parents=True, exist_ok=True)
    shards = ensure_shards(args.work, env)  # shuffled, as the demo's (conf/data/emoji.yaml)
    runs = []
    for seed in args.seeds:
        for name, overrides in variants.items():
            work = args.work / f"{re.sub(r'[^A-Za-z0-9.-]+', '_', name)}-seed{seed}"  # no comma: Hydra splits there
            work.mkdir(exist_ok=True)
            metrics = pretrain(work, shards, seed, overrides, env)
            runs.append({"variant": name, "overrides": overrides, "seed": seed, **metrics})
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
    summary = summarise(runs, (*METRICS, "seconds"))
    write_results({"seeds": args.seeds, "variants": variants, "runs": runs, "summary": summary}, REPO / OUT)


if __name__ == "__main__":
    main()
