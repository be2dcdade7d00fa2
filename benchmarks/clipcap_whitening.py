"""Does whitening the CLIP embeddings let ClipCap learn? Raw vs PCA-whitened embeddings, side by side.

    python benchmarks/clipcap_whitening.py --work data/clipcap     # after `make clipcap`
    python benchmarks/clipcap_whitening.py --work data/clipcap --steps 400 --ridges 1e-3,1e-5

Reads a train_clipcap work directory: its CLIP embedding cache (`embeddings/<key>/`) and its pretrained
decoder (`decoders/<key>/decoder`, with the tokenizer). For each variant a captioner (mlp mapping, prefix 10)
starts from the same decoder and seed and trains in this process (AdamW, one-cycle schedule, batches of 128)
on the training images; every quarter of the run it captions 200 training images greedily and reports the
share that comes back exactly (the memorisation check of tests/test_clipcap.py). The embedding geometry is
reported too: the variance share of the top 2 principal directions and the mean cosine of each image to its
nearest neighbour. Results go to benchmarks/results/clipcap_whitening.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.caption.data import encode_captions, read_embeddings  # noqa: E402
from components.caption.metrics import exact_match  # noqa: E402
from components.caption.model import ClipCap, EmbeddingWhitening, caption_texts  # noqa: E402
from components.models.tokenizer import load_tokenizer  # noqa: E402


def latest(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"nothing matches {directory / pattern}: run `make clipcap` (or give --work) first")
    return found[-1]


def geometry(embeddings: np.ndarray) -> dict[str, float]:
    centred = embeddings - embeddings.mean(axis=0)
    values = np.linalg.svd(centred, compute_uv=False) ** 2
    cosine = embeddings @ embeddings.T
    np.fill_diagonal(cosine, -1)
    return {"top2_variance_share": float(values[:2].sum() / values.sum()),
            "nearest_neighbour_cosine": float(cosine.max(axis=1).mean())}


def train(variant: str, ridge: float | None, embeddings: np.ndarray, captions: list[str], decoder: Path, tokenizer,
          steps: int, lr: float, checks: np.ndarray, references: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        whitening = None
        if ridge is not None:
            whitening = Path(tmp) / "whitening.safetensors"
            EmbeddingWhitening.fit(embeddings, ridge).save(whitening)
        torch.manual_seed(0)
        model = ClipCap(embeddings.shape[1], len(tokenizer), 10, "mlp", pretrained=str(decoder),
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, whitening=whitening)
    ids, mask = (torch.from_numpy(a) for a in encode_captions(tokenizer, captions, 24))
    clip = torch.from_numpy(embeddings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    generator, history, start = torch.Generator().manual_seed(0), [], time.perf_counter()
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(captions), (128,), generator=generator)
        model.train()
        loss = model(clip[batch], ids[batch], mask[batch])
        optimizer.zero_grad()
        loss.backward()
        loss = loss.item()
        optimizer.step()
        schedule.step()
        if step % max(1, steps // 4) == 0:
            model.eval()
            generated = caption_texts(model, tokenizer, clip[checks], method="greedy", max_length=24)
            exact = exact_match(references, dict(zip(references, generated)))
            history.append({"step": step, "loss": round(loss, 4), "exact": round(exact, 3)})
            print(f"{variant:>18} step {step:4d}  loss {loss:.3f}  training captions exact {exact:.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("data/clipcap"), help="a train_clipcap work_dir")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--ridges", default="1e-3,1e-5", help="whitening ridges tried besides raw embeddings")
    args = parser.parse_args()

    cache = latest(args.work / "embeddings", "*/_cache.json").parent
    decoder = latest(args.work / "decoders", "*/decoder/config.json").parent
    train_rows = read_embeddings(cache, "train")
    embeddings = np.stack(train_rows["emb"]).astype(np.float32)
    captions = list(train_rows["caption"])
    tokenizer = load_tokenizer(decoder)
    checks = np.random.RandomState(0).choice(len(captions), min(200, len(captions)), replace=False)
    references = {str(i): json.loads(train_rows["captions"][i]) for i in checks}
    print(f"{len(captions)} training images, embedding dim {embeddings.shape[1]}, decoder {decoder}")
    shape = geometry(embeddings)
    print(f"top-2 principal directions hold {shape['top2_variance_share']:.0%} of the variance; mean cosine to the "
          f"nearest neighbour {shape['nearest_neighbour_cosine']:.4f}")

    variants = {"raw": None, **{f"whitened ridge {r}": float(r) for r in args.ridges.split(",") if r}}
    results = {name: train(name, ridge, embeddings, captions, decoder, tokenizer, args.steps, args.lr, checks,
                           references) for name, ridge in variants.items()}
    out = Path(__file__).parent / "results" / "clipcap_whitening.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cache": str(cache),
                               "training_images": len(captions), "geometry": shape, "steps": args.steps,
                               "lr": args.lr, "results": results}, indent=2) + "\n")
    print("\n" + "\n".join(f"{name:>18}: exact {history[-1]['exact']:.3f} after {args.steps} steps"
                           for name, history in results.items()))
    print(f"written {out}")


if __name__ == "__main__":
    main()
