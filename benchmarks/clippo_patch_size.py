"""Does a tiny CLIPPO learn to read? The shared tower's patch size, side by side on the built-in corpus.

    python benchmarks/clippo_patch_size.py                       # 8 px vs 16 px patches, 300 steps each
    python benchmarks/clippo_patch_size.py --patch-sizes 16 --steps 400

A randomly initialised `tiny` CLIPPO (64 px images, captions rendered with GNU Unifont at 16 px) trained by a
plain PyTorch loop in one process: images and rendered captions in memory, no augmentation, global batch 128,
AdamW lr 1e-3 with 10% warmup and cosine decay, our InfoNCE loss. Every 50 steps it prints the loss, held-out
image->text R@5 on the test concepts (never trained on; chance = 5 / captions), R@5 among 256 training pairs
(does it memorise?), and the mean pairwise cosine of the held-out caption embeddings (1.0: every rendered
caption embeds alike, the collapse this benchmark is about). Results go to benchmarks/results/clippo_patch_size.json.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import write_results  # noqa: E402
from benchmarks.train_throughput import ingest  # noqa: E402

OUT = "benchmarks/results/clippo_patch_size.json"


def train(shards: Path, patch_size: int, steps: int, batch: int, lr: float) -> list[dict]:
    import torch
    from PIL import Image
    from transformers import get_cosine_schedule_with_warmup

    from components.models.base import normalize_pixels
    from components.models.factory import build_model
    from components.models.unifont import render_text
    from components.train.losses import ContrastiveLoss
    from tests.helpers import read_shards

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = read_shards(shards)
    train_rows = [r for r in rows if r["json"]["split"] == "train"]
    test_rows = [r for r in rows if r["json"]["split"] == "test"]
    model = build_model("clippo", "tiny", patch_size=patch_size)
    size = model.image_size

    def pixels(subset):
        return np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB").resize((size, size)))
                         for r in subset])

    def embed(images: np.ndarray, side: str = "image") -> torch.Tensor:
        """uint8 images (photos, or rendered captions for side="text") -> normalised embeddings."""
        values = normalize_pixels(images, model.image_mean, model.image_std)
        return (model.encode_image(values) if side == "image" else model.encode_text({"text_pixels": values}))[0]

    train_images, test_images = pixels(train_rows), pixels(test_rows)
    train_texts = render_text([r["txt"] for r in train_rows], size, model.font_size)
    test_captions = sorted({r["txt"] for r in test_rows})
    test_texts = render_text(test_captions, size, model.font_size)
    test_truth = torch.tensor([test_captions.index(r["txt"]) for r in test_rows])

    def recall_at_5(similarity: torch.Tensor, truth: torch.Tensor) -> float:
        rank = (similarity > similarity[torch.arange(len(truth)), truth][:, None]).sum(1)
        return (rank < 5).float().mean().item()

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            captions = embed(test_texts, "text")
            heldout = embed(test_images) @ captions.T
            seen = embed(train_images[:256]) @ embed(train_texts[:256], "text").T
        model.train()
        off_diagonal = ~torch.eye(len(captions), dtype=torch.bool)
        return {"heldout_R5": round(recall_at_5(heldout, test_truth), 4),
                "chance_R5": round(min(1.0, 5 / len(test_captions)), 4),
                "train_R5_of_256": round(recall_at_5(seen, torch.arange(len(seen))), 4),
                "caption_cosine": round((captions @ captions.T)[off_diagonal].mean().item(), 4)}

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    scheduler = get_cosine_schedule_with_warmup(optimizer, steps // 10, steps)
    loss_fn = ContrastiveLoss()
    generator = torch.Generator().manual_seed(0)
    log, started = [], time.perf_counter()
    for step in range(steps):
        index = torch.randint(len(train_rows), (batch,), generator=generator).numpy()
        loss = loss_fn((embed(train_images[index]),), (embed(train_texts[index], "text"),), model.similarity,
                       model.logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if step % 50 == 0 or step == steps - 1:
            entry = {"step": step, "loss": round(loss.item(), 3), **evaluate(),
                     "seconds": round(time.perf_counter() - started, 1)}
            log.append(entry)
            print(f"  patch {patch_size:2d} " + "  ".join(f"{k} {v}" for k, v in entry.items()), flush=True)
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    results: dict = {"settings": vars(args), "cores": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="clipforge-clippo-bench-") as work:
        print("ingesting the built-in corpus ...", flush=True)
        shards = ingest(Path(work), env)
        for patch_size in args.patch_sizes:
            results["runs"][str(patch_size)] = train(shards, patch_size, args.steps, args.batch, args.lr)

    print(f"\n{'patch':>5} {'loss':>6} {'held-out R@5':>12} {'chance':>6} {'train R@5':>9} {'caption cos':>11} "
          f"{'s/step':>6}")
    for patch_size, log in results["runs"].items():
        last = log[-1]
        print(f"{patch_size:>5} {last['loss']:6.3f} {last['heldout_R5']:12.3f} {last['chance_R5']:6.3f} "
              f"{last['train_R5_of_256']:9.3f} {last['caption_cosine']:11.3f} "
              f"{last['seconds'] / (last['step'] + 1):6.2f}")
    write_results(results, args.out)


if __name__ == "__main__":
    main()
