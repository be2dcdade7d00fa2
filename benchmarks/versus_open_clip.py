"""Our CLIP recipe against open_clip's: the same corpus, tower sizes and budget, scored by one evaluation.

    python benchmarks/versus_open_clip.py                          # 3 seeds x 64,000 samples (~1.5 h on 2 cores)
    python benchmarks/versus_open_clip.py --seeds 0 --samples 12800       # a quick look
    python benchmarks/versus_open_clip.py --ours deepspeed.gradient_clipping=0   # a lead: our recipe changed
    python benchmarks/versus_open_clip.py --clip-tokenizer          # ours with CLIP's 49k BPE instead of our own

Both recipes train a randomly initialised CLIP with `tiny` towers (width 128, 4 layers, 4 heads, patch 8 at 64 px,
embedding 128) on the built-in corpus' OpenMoji drawings of its training concepts only, with batch 128, learning
rate 1e-3, 10% warmup then cosine, random resized crops of scale 0.8-1.0 and the same number of samples:
- ours: `pipelines/pretrain_clip.py` as a user runs it (Ray Train, DeepSpeed, our tokenizer and data pipeline);
- open_clip's: `benchmarks/open_clip_recipe.py` in a virtual environment this script builds on first use
  (torch 2.14.1, torchvision 0.29.1, open_clip_torch: torchvision cannot live beside our torch).
Each side then scores every image of the corpus against every caption (open_clip's by cosine, ours by its family's
own similarity, so `--ours model=filip` or `model=clippo` compares those families too), and this script ranks both
with the same code (components/eval/metrics.py) on three held-out sets:
- unseen concepts, seen style: OpenMoji drawings of the test concepts;
- held-out style: every Twemoji drawing (a known concept drawn differently, as real data differs);
- held-out style and unseen concepts: Twemoji drawings of the test concepts.
Reported per set and recipe: image->text and text->image R@1/R@5 and zero-shot group top-1 (9 groups, the bare
group name as prompt) against the majority group's share; mean and range over seeds, and ours/open_clip ratios.
Results go to benchmarks/results/versus_open_clip.json; with `--ours` (overrides of our recipe, one lead at a
time) to versus_open_clip-<overrides>.json, its runs in their own directories (open_clip's are reused).
`--clip-tokenizer` is such a lead: CLIP's 49,408-token BPE (the vocabulary open_clip ships) written in transformers'
format and given to ours as `tokenizer.path`, in place of the BPE ours trains on the captions.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import write_results  # noqa: E402

OUT = "benchmarks/results/versus_open_clip.json"
OPEN_CLIP_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "open_clip_torch"]
TRAIN = {"style": "openmoji", "split": "train"}
HELD_OUT = {"unseen concepts, seen style": {"style": "openmoji", "split": "test"},
            "held-out style": {"style": "twemoji"},
            "held-out style, unseen concepts": {"style": "twemoji", "split": "test"}}
RECIPES = ("ours", "open_clip")


def ensure_open_clip_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"building open_clip's environment in {venv} (first run only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *OPEN_CLIP_PACKAGES], check=True)
    return python


def clip_tokenizer(open_clip_python: Path, out: Path, captions: list[str]) -> Path:
    """CLIP's BPE as open_clip's SimpleTokenizer builds it from its merges file (256 byte units, the same with the
    end-of-word mark, one token per merge, then start and end of text: 49,408 ids), saved as a transformers
    CLIPTokenizer in `out`. Checked against SimpleTokenizer itself on `captions`, in open_clip's environment."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if not (out / "tokenizer.json").exists():
        find = "import open_clip.tokenizer as t; print(t.default_bpe())"
        merges_file = subprocess.run([str(open_clip_python), "-c", find], check=True, capture_output=True,
                                     text=True).stdout.strip()
        merges = gzip.open(merges_file).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        units = list(bytes_to_unicode().values())
        vocab = [*units, *(u + "</w>" for u in units), *("".join(m.split()) for m in merges),
                 "<|startoftext|>", "<|endoftext|>"]
        tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges])
        # open_clip first cleans text with ftfy (curly quotes made straight, for one), which transformers' CLIP
        # tokenizer does not do: the check compares the vocabulary and merges on open_clip's cleaned text.
        cleaned, theirs = json.loads(subprocess.run(
            [str(open_clip_python), "-c", "import json, sys, open_clip.tokenizer as t; s = t.SimpleTokenizer(); "
             "texts = [t.whitespace_clean(t.basic_clean(c)) for c in json.load(sys.stdin)]; "
             "print(json.dumps([texts, [s.encode(c) for c in texts]]))"],
            input=json.dumps(captions), check=True, capture_output=True, text=True).stdout)
        ours = [ids[1:-1] for ids in tokenizer(cleaned).input_ids]  # without start and end of text
        differ = [c for c, a, b in zip(cleaned, ours, theirs) if a != b]
        if differ:
            raise RuntimeError(f"CLIP's BPE in transformers' format encodes {len(differ)} of {len(captions)} "
                               f"captions unlike open_clip, e.g. {differ[0]!r}")
        tokenizer.save_pretrained(out)
    return out


def ensure_shards(work: Path, env: dict, name: str = "shards", *overrides: str) -> Path:
    """The whole built-in corpus ingested into work/<name> (with these ingest overrides), once."""
    out = work / name
    if not (out / "_manifest.json").exists():
        subprocess.run([sys.executable, str(REPO / "pipelines" / "ingest.py"), "data=emoji_local",
                        f"data.corpus_dir={REPO / 'data' / 'emoji_corpus'}", f"data.output_dir={out}",
                        "progress=false", f"hydra.run.dir={work / 'hydra' / f'ingest-{name}'}", *overrides],
                       check=True, cwd=work, env=env)
    return out


def matches(meta: dict, where: dict) -> bool:
    return all(meta[k] == v for k, v in where.items())


def corpus_file(rows: list[dict], texts: list[str], path: Path) -> None:
    """What open_clip's side reads: the same decoded pixels, the training mask, each row's caption, the texts."""
    from PIL import Image

    pixels = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
    np.savez(path, pixels=pixels, train=np.array([matches(r["json"], TRAIN) for r in rows]),
             captions=json.dumps([r["txt"] for r in rows]), texts=json.dumps(texts))


def train_ours(work: Path, shards: Path, seed: int, args: argparse.Namespace, env: dict) -> Path:
    export = work / "model"
    if not (export / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "pipelines" / "pretrain_clip.py"), "data=emoji_local",
                        # the corpus' config already selects split train (training) and test (its own check)
                        f"data.output_dir={shards}", "+data.train_where.style=openmoji",
                        "+data.eval_where.style=twemoji",
                        f"trainer.samples={args.samples}", "trainer.global_batch=128", "trainer.lr=0.001",
                        "trainer.warmup_fraction=0.1", "trainer.augment.scale=[0.8,1.0]", f"trainer.seed={seed}",
                        f"export_dir={export}", f"tokenizer.save_dir={work / 'tokenizer'}",
                        f"trainer.storage_path={work / 'ray'}", "progress=false", f"hydra.run.dir={work / 'hydra'}",
                        *args.ours],
                       check=True, cwd=work, env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"})
    return export


def similarity_ours(export: Path, rows: list[dict], texts: list[str]) -> np.ndarray:
    """[rows, texts] similarities by the family's own similarity: cosine for CLIP and CLIPPO, token-wise for FILIP
    (`--ours model=filip`)."""
    from components.eval.embed import load_export
    from components.eval.retrieval import similarity_matrix
    from components.models.inference import image_features, text_features

    model, text = load_export(export)
    return similarity_matrix(model.similarity, image_features(model, [r["image"] for r in rows]),
                             text_features(model, text, texts))


def scores(similarity: np.ndarray, rows: list[dict], text_index: dict[str, int], groups: list[str],
           where: dict) -> dict[str, float]:
    """Retrieval both ways over the set's distinct captions, and zero-shot group top-1 (the same code for both
    recipes)."""
    from components.eval.metrics import retrieval_metrics_from_ranks, retrieval_ranks_both_ways

    chosen = [i for i, r in enumerate(rows) if matches(r["json"], where)]
    captions = sorted({text_index[rows[i]["txt"]] for i in chosen})
    column = {t: j for j, t in enumerate(captions)}
    among_captions = similarity[np.ix_(chosen, captions)]
    image_ranks, text_ranks = retrieval_ranks_both_ways(lambda r, c: among_captions[r, c], len(chosen), len(captions),
                                                        [{column[text_index[rows[i]["txt"]]]} for i in chosen])
    truth = np.array([groups.index(rows[i]["json"]["group"]) for i in chosen])
    predicted = similarity[np.ix_(chosen, [text_index[g] for g in groups])].argmax(axis=1)
    return {**retrieval_metrics_from_ranks(image_ranks, prefix="image_to_text"),
            **retrieval_metrics_from_ranks(text_ranks[text_ranks > 0], prefix="text_to_image"),
            "group_top1": float((predicted == truth).mean()),
            "group_majority": float(np.bincount(truth).max() / len(truth)),
            "images": len(chosen), "captions": len(captions)}


def summarise(results: list[dict]) -> dict:
    keys = ("image_to_text_R1", "image_to_text_R5", "text_to_image_R1", "text_to_image_R5", "group_top1")
    table = {}
    for name in HELD_OUT:
        row = {"group_majority": results[0]["sets"][name]["group_majority"]}  # the same rows for every run
        for recipe in RECIPES:
            runs = [r["sets"][name] for r in results if r["recipe"] == recipe]
            row[recipe] = {k: {"mean": float(np.mean([m[k] for m in runs])), "min": min(m[k] for m in runs),
                               "max": max(m[k] for m in runs)} for k in keys}
        row["ratio_R1_image_to_text"] = (row["ours"]["image_to_text_R1"]["mean"]
                                         / max(row["open_clip"]["image_to_text_R1"]["mean"], 1e-9))
        table[name] = row
    return table


def print_table(table: dict, seeds: int) -> None:
    print(f"\nmean of {seeds} seed(s), percent (min-max)")
    for name, row in table.items():
        print(f"\n{name} (zero-shot majority {100 * row['group_majority']:.1f}):")
        for recipe in RECIPES:
            cells = "  ".join(f"{k} {100 * v['mean']:5.1f} ({100 * v['min']:.1f}-{100 * v['max']:.1f})"
                              for k, v in row[recipe].items())
            print(f"  {recipe:9} {cells}")
        print(f"  ours / open_clip, image->text R@1: {row['ratio_R1_image_to_text']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=64_000)
    parser.add_argument("--work", type=Path, default=REPO / "data" / "benchmarks" / "versus_open_clip")
    parser.add_argument("--venv", type=Path, default=REPO / "data" / "venvs" / "open_clip",
                        help="open_clip's virtual environment (built here when missing)")
    parser.add_argument("--ours", nargs="+", default=[], metavar="OVERRIDE",
                        help="Hydra overrides of our recipe (a lead to measure), e.g. deepspeed.gradient_clipping=0")
    parser.add_argument("--clip-tokenizer", action="store_true",
                        help="a lead: ours with CLIP's 49k BPE (open_clip's vocabulary) instead of its own")
    args = parser.parse_args()
    # names the lead's run directories and results file
    lead = "-".join([*(o.replace("=", "_").replace("/", "_") for o in args.ours),
                     *(["clip_tokenizer"] if args.clip_tokenizer else [])])
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    args.work.mkdir(parents=True, exist_ok=True)
    open_clip_python = ensure_open_clip_venv(args.venv)
    from tests.helpers import read_shards

    rows = read_shards(ensure_shards(args.work, env))
    groups = sorted({r["json"]["group"] for r in rows})
    texts = sorted({r["txt"] for r in rows} | set(groups))
    text_index = {t: i for i, t in enumerate(texts)}
    corpus = args.work / "corpus.npz"
    corpus_file(rows, texts, corpus)
    if args.clip_tokenizer:
        clip_bpe = clip_tokenizer(open_clip_python, args.work / "clip_tokenizer", texts)
        args.ours = [*args.ours, f"tokenizer.path={clip_bpe}"]
    results = []
    for seed in args.seeds:
        for recipe in RECIPES:
            work = args.work / f"{recipe}-{args.samples}-seed{seed}{f'-{lead}' if lead and recipe == 'ours' else ''}"
            work.mkdir(exist_ok=True)
            start = time.time()
            if recipe == "ours":
                similarity = similarity_ours(train_ours(work, args.work / "shards", seed, args, env), rows, texts)
            else:
                out = work / "embeddings.npz"
                if not out.exists():
                    subprocess.run([str(open_clip_python), str(REPO / "benchmarks" / "open_clip_recipe.py"),
                                    "--corpus", str(corpus), "--out", str(out), "--seed", str(seed),
                                    "--samples", str(args.samples), "--threads", str(os.cpu_count())],
                                   check=True, env=env)
                saved = np.load(out)
                similarity = saved["images"] @ saved["texts"].T
            sets = {name: scores(similarity, rows, text_index, groups, where) for name, where in HELD_OUT.items()}
            results.append({"recipe": recipe, "seed": seed, "seconds": time.time() - start, "sets": sets})
            print(f"{recipe} seed {seed}: " + "; ".join(
                f"{name}: i->t R@1 {m['image_to_text_R1']:.3f} R@5 {m['image_to_text_R5']:.3f}, "
                f"group top-1 {m['group_top1']:.3f}" for name, m in sets.items()), flush=True)
    table = summarise(results)
    print_table(table, len(args.seeds))
    write_results({"samples": args.samples, "seeds": args.seeds, "train": TRAIN, "held_out": HELD_OUT,
                   "ours_overrides": args.ours, "runs": results, "table": table},
                  REPO / (OUT.replace(".json", f"-{lead}.json") if lead else OUT))


if __name__ == "__main__":
    main()
