"""Training steps with captions padded to the model's length (how clipforge trained before) against steps that cut
the batch after its longest caption (components/train/tasks.py: trimmed_tokens), side by side on the same batches.

    python benchmarks/dynamic_padding.py                  # tiny CLIP, batch 64, 1 thread (one CPU worker's share)
    python benchmarks/dynamic_padding.py --preset small --threads 4

The captions are the built-in corpus' English names (data/emoji_corpus, built if missing), tokenized by a BPE
trained on them, as pretraining does. Forward, symmetric InfoNCE, backward and an AdamW step, alternating the two
ways step by step so that both see the same machine load. The two ways' text features agree (checked). Results
go to benchmarks/results/dynamic_padding.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_results  # noqa: E402
from components.data.emoji_corpus import build_corpus, local_source  # noqa: E402
from components.models.factory import build_model  # noqa: E402
from components.models.tokenizer import train_bpe  # noqa: E402
from components.train.tasks import model_inputs  # noqa: E402

OUT = "benchmarks/results/dynamic_padding.json"


def step(model, optimizer, batch: dict[str, torch.Tensor]) -> float:
    started = time.perf_counter()
    pixels, text = model_inputs(model, batch, torch.float32)
    image, caption = model.encode_image(pixels)[0], model.encode_text(text)[0]
    logits = model.logit_scale.exp() * image @ caption.T
    labels = torch.arange(len(logits))
    loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    corpus = build_corpus(Path(__file__).resolve().parents[1] / "data" / "emoji_corpus", image_size=72)
    captions = local_source(corpus).column("caption").to_pylist()
    tokenizer = train_bpe(captions, vocab_size=4096)
    torch.manual_seed(0)
    model = build_model("clip", args.preset, vocab_size=len(tokenizer), image_size=64,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {"padded": [], "trimmed": []}
    lengths = []
    for number in range(args.steps + 2):  # the first two steps of each way warm up
        chosen = [captions[i] for i in rng.choice(len(captions), args.batch, replace=False)]
        encoded = tokenizer(chosen, padding="max_length", truncation=True, max_length=model.max_text_length,
                            return_tensors="pt")
        batch = {"pixels": torch.randint(0, 256, (args.batch, 64, 64, 3), dtype=torch.uint8), **encoded}
        with torch.no_grad():
            padded = model.encode_text({"input_ids": encoded["input_ids"],
                                        "attention_mask": encoded["attention_mask"]})[0]
            trimmed = model.encode_text(model_inputs(model, batch, torch.float32)[1])[0]
        if not torch.allclose(padded, trimmed, atol=1e-5):
            raise SystemExit("padded and trimmed batches give different text features")
        lengths.append(int(encoded["attention_mask"].sum(dim=1).max()))
        padded_time = step_padded(model, optimizer, batch)
        trimmed_time = step(model, optimizer, batch)
        if number >= 2:
            times["padded"].append(padded_time)
            times["trimmed"].append(trimmed_time)
    padded_s, trimmed_s = float(np.median(times["padded"])), float(np.median(times["trimmed"]))
    row = {"preset": args.preset, "batch": args.batch, "threads": args.threads, "model_length": model.max_text_length,
           "longest_caption_median": float(np.median(lengths)), "padded_s_per_step": padded_s,
           "trimmed_s_per_step": trimmed_s, "speedup": padded_s / trimmed_s}
    print(f"{args.preset}, batch {args.batch}, {args.threads} thread(s): padded to {model.max_text_length} tokens "
          f"{padded_s:.3f} s/step, cut at the longest caption (median {row['longest_caption_median']:.0f}) "
          f"{trimmed_s:.3f} s/step: {row['speedup']:.2f}x", flush=True)
    write_results({"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
                   "rows": [row]}, Path(__file__).resolve().parents[1] / OUT)


def step_padded(model, optimizer, batch: dict[str, torch.Tensor]) -> float:
    """`step` with the model told its text length is fixed: nothing is cut (FILIP's path)."""
    model.fixed_text_length = True
    try:
        return step(model, optimizer, batch)
    finally:
        del model.fixed_text_length


if __name__ == "__main__":
    main()
