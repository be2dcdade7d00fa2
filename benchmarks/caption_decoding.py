"""Caption decoding with transformers' generate (key/value cache) against recomputing the whole sequence every step
(how clipforge decoded before), side by side on the same captioner.

    python benchmarks/caption_decoding.py                      # presets tiny and small, 64 images, 24 tokens
    python benchmarks/caption_decoding.py --presets base --images 16

A ClipCap (mlp mapping, prefix 10) from random init: speed does not depend on training once every caption runs
the same number of tokens, so eos is forbidden until max_length (min_length = max_length). Greedy both ways must
give the same tokens (checked); beam search (width 5) is timed for ClipCap.generate only. Results go to
benchmarks/results/caption_decoding.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_results  # noqa: E402
from components.caption.model import ClipCap  # noqa: E402

OUT = "benchmarks/results/caption_decoding.json"
VOCAB = 4096  # the size of the tokenizer the pipelines train


@torch.no_grad()
def greedy_recomputing(model: ClipCap, embeddings: torch.Tensor, length: int) -> list[list[int]]:
    """Greedy decoding that runs the decoder over the prefix and every token so far at each step (no cache)."""
    prefix = model.prefix(embeddings)
    tokens = torch.zeros(len(embeddings), 0, dtype=torch.long)
    for _ in range(length):
        embeds = torch.cat([prefix, model.decoder.transformer.wte(tokens)], dim=1)
        logits = model.decoder(inputs_embeds=embeds).logits[:, -1]
        logits[:, model.eos_token_id] = -torch.inf  # as min_length = length
        tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return tokens.tolist()


def timed(function, repeats: int) -> tuple[float, object]:
    function()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        result = function()
    return (time.perf_counter() - started) / repeats, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        torch.manual_seed(0)
        model = ClipCap(clip_dim=128, vocab_size=VOCAB, prefix_length=10, mapping="mlp", preset=preset,
                        eos_token_id=0, pad_token_id=0).eval()
        embeddings = torch.randn(args.images, 128)
        settings = {"max_length": args.length, "min_length": args.length}
        cached, by_generate = timed(lambda: model.generate(embeddings, "greedy", **settings), args.repeats)
        recomputed, by_recomputing = timed(lambda: greedy_recomputing(model, embeddings, args.length), args.repeats)
        if by_generate != by_recomputing:
            raise SystemExit(f"{preset}: greedy with the cache and without it disagree")
        beam, _ = timed(lambda: model.generate(embeddings, "beam", beam_width=5, **settings), args.repeats)
        row = {"preset": preset, "images": args.images, "tokens": args.length,
               "greedy_generate_images_per_s": args.images / cached,
               "greedy_recomputing_images_per_s": args.images / recomputed,
               "speedup": recomputed / cached, "beam5_generate_images_per_s": args.images / beam}
        rows.append(row)
        print(f"{preset}: greedy {row['greedy_generate_images_per_s']:.1f} images/s with generate, "
              f"{row['greedy_recomputing_images_per_s']:.1f} recomputing ({row['speedup']:.2f}x); "
              f"beam 5 {row['beam5_generate_images_per_s']:.1f} images/s", flush=True)
    write_results({"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                               "torch": torch.__version__},
                   "rows": rows}, Path(__file__).resolve().parents[1] / OUT)


if __name__ == "__main__":
    main()
