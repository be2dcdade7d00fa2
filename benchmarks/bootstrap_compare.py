r"""The DataComp-style bootstrap loop, read back: how well did the filter find the wrong captions, and does the
model trained on the filtered pool (B) evaluate better than the one trained on the raw pool (A)?

    make bootstrap                                            # salted 30%, keep 70% (the defaults)
    python benchmarks/bootstrap_compare.py data/workflow/emoji_salted

    make bootstrap ARGS="work_dir=data/workflow/salted50 \
        'data_overrides=[\"data.mismatch.fraction=0.5\",\"data.output_dir=data/shards/emoji_salted50\"]' \
        'overrides.clip_filter=[\"filter.keep_fraction=0.5\"]' \
        'overrides.pretrain=[\"trainer.samples=25600\"]' 'overrides.pretrain_filtered=[\"trainer.samples=25600\"]'"
    python benchmarks/bootstrap_compare.py data/workflow/salted50

Reads a workflow directory's state.json (pipelines/end_to_end.py): the clip_filter stage's manifest and
per-row scores (precision/recall of the removal, ROC AUC of the score for "caption is wrong") and the results
of evaluate (model A) and evaluate_filtered (model B) on the same held-out rows. Prints one Markdown table and
writes benchmarks/results/bootstrap_<work dir name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

# (label, results file, metric, higher is better)
HEADLINE = [
    ("zero-shot acc@1", "zeroshot_classification", "acc1", True),
    ("image->text R@5", "zeroshot_retrieval", "image_to_text_R5", True),
    ("image->text R@10", "zeroshot_retrieval", "image_to_text_R10", True),
    ("image->text median rank", "zeroshot_retrieval", "image_to_text_median_rank", False),
    ("text->image R@1", "zeroshot_retrieval", "text_to_image_R1", True),
    ("text->image R@5", "zeroshot_retrieval", "text_to_image_R5", True),
    ("text->image R@10", "zeroshot_retrieval", "text_to_image_R10", True),
    ("text->image median rank", "zeroshot_retrieval", "text_to_image_median_rank", False),
    ("linear probe acc@1", "linear_probe", "acc1", True),
]
MULTILINGUAL = [("image_to_text_R5", "image->text"), ("text_to_image_R5", "text->image")]


def metrics(results_dir: Path, name: str) -> dict[str, float]:
    found = json.loads((results_dir / f"{name}.json").read_text())
    return (found[0] if isinstance(found, list) else found)["metrics"]


def multilingual_mean(results_dir: Path, metric: str) -> float:
    files = sorted(results_dir.glob("multilingual_retrieval_*.json"))
    return float(np.mean([metrics(results_dir, f.stem)[metric] for f in files]))


def roc_auc(scores: np.ndarray, wrong: np.ndarray) -> float:
    """P(a wrong pair scores below a right one), ties counted half: the Mann-Whitney form of the ROC AUC."""
    right, bad = scores[~wrong], scores[wrong]
    below = (bad[:, None] < right[None, :]).mean() + 0.5 * (bad[:, None] == right[None, :]).mean()
    return float(below)


def compare(work_dir: Path) -> dict:
    state = json.loads((work_dir / "state.json").read_text())
    missing = [s for s in ("clip_filter", "evaluate", "evaluate_filtered") if state.get(s, {}).get("status") != "done"]
    if missing:
        raise SystemExit(f"{work_dir}: no finished {', '.join(missing)} stage: run `make bootstrap` first")
    filtered = Path(state["clip_filter"]["outputs"]["shards"])
    manifest = json.loads((filtered / "_manifest.json").read_text())
    scores = pq.read_table(filtered / "_scores.parquet").to_pandas()
    scores = scores[scores["in_scope"]]
    truth = manifest.get("against_truth") or {}
    filter_report = {"in_scope": int(len(scores)), "kept": manifest["kept"], "threshold": manifest["threshold"],
                     **truth}
    if "caption_mismatched" in scores:
        filter_report["roc_auc"] = roc_auc(scores["model_score"].to_numpy(), scores["caption_mismatched"].to_numpy(bool))
    models = {"A": Path(state["evaluate"]["outputs"]["results_dir"]),
              "B": Path(state["evaluate_filtered"]["outputs"]["results_dir"])}
    rows = []
    for label, name, key, higher in HEADLINE:
        a, b = (metrics(d, name)[key] for d in models.values())
        rows.append({"metric": label, "A": a, "B": b, "B better": (b > a) if higher else (b < a)})
    for key, label in MULTILINGUAL:
        a, b = (multilingual_mean(d, key) for d in models.values())
        rows.append({"metric": f"{label} R@5, mean of 14 languages", "A": a, "B": b, "B better": b > a})
    return {"work_dir": work_dir.name, "model_uris": {"A": state["pretrain"]["outputs"]["model_uri"],
                                                       "B": state["pretrain_filtered"]["outputs"]["model_uri"]},
            "filter": filter_report, "heldout": rows}


def table(report: dict) -> str:
    f = report["filter"]
    lines = [f"filter: {f['in_scope']} rows in scope, kept {f['kept']} (all rows), threshold {f['threshold']:.4f}"]
    if "precision" in f:
        lines.append(f"  wrong captions {f['wrong_fraction_before']:.1%} -> {f['wrong_fraction_after']:.1%}; "
                     f"precision {f['precision']:.3f}, recall {f['recall']:.3f}, ROC AUC {f['roc_auc']:.3f}")
    lines += ["", f"| held-out | A {report['model_uris']['A']} | B {report['model_uris']['B']} | B better |",
              "|---|---:|---:|:---:|"]
    lines += [f"| {r['metric']} | {r['A']:.3f} | {r['B']:.3f} | {'yes' if r['B better'] else 'no'} |"
              for r in report["heldout"]]
    wins = sum(r["B better"] for r in report["heldout"])
    lines.append(f"\nB better on {wins} of {len(report['heldout'])} held-out metrics")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dirs", nargs="+", type=Path, help="workflow directories of make bootstrap runs")
    args = parser.parse_args()
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    for work_dir in args.work_dirs:
        report = compare(work_dir)
        (out_dir / f"bootstrap_{work_dir.name}.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"## {work_dir}\n{table(report)}\n")


if __name__ == "__main__":
    sys.exit(main())
