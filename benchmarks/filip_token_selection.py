"""FILIP's token selection (paper, section 3.1.2): what keeping each sample's top 25% of tokens saves per rank.

    python benchmarks/filip_token_selection.py                         # 8 ranks x 64, base towers at 224 px
    python benchmarks/filip_token_selection.py --world 2 --patches 64 --tokens 32     # tiny at 64 px

For rank 0 of a `--world`-rank job, FILIP's loss (select_tokens on the local features, the all-gather, the paper's
two token-wise similarities, InfoNCE) runs forward and backward on PyTorch's meta device, as
benchmarks/contrastive_loss_memory.py does for CLIP: shapes only, the gather replaced by tiling. Reported per
fraction, with the global and the local loss: the bytes each rank receives from the all-gather and the loss's
peak working memory. The quality side
(held-out retrieval with and without selection) is measured by training, see BENCHMARKS.md.
Results go to benchmarks/results/filip_token_selection.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import components.train.losses as losses  # noqa: E402
from benchmarks.contrastive_loss_memory import LiveBytes  # noqa: E402
from components.models.filip import FILIP  # noqa: E402


def filip_loss_memory(world: int, local_batch: int, patches: int, tokens: int, dim: int,
                      fraction: float | None, local_loss: bool) -> dict[str, float]:
    gathered = {}

    def tiled(features, with_grad=True):
        out = tuple(t.repeat(world, *[1] * (t.dim() - 1)) for t in features)
        gathered[len(gathered)] = sum(t.numel() * t.element_size() for t in out if t.is_floating_point())
        return out

    losses.dist_rank_world = lambda: (0, world)
    losses.gather_features = tiled
    model = FILIP.__new__(FILIP)  # select_tokens and loss_similarity read only the fraction
    model.token_topk_fraction = fraction
    image = torch.randn(local_batch, patches, dim, device="meta", requires_grad=True)
    text = torch.randn(local_batch, tokens, dim, device="meta", requires_grad=True)
    mask = torch.ones(local_batch, tokens, device="meta")
    scale = torch.zeros((), device="meta", requires_grad=True)
    with LiveBytes() as counter:
        image_kept, text_kept = model.select_tokens((image,), (text, mask))
        loss = losses.ContrastiveLoss(local_loss=local_loss)(image_kept, text_kept, model.loss_similarity, scale)
        forward = counter.peak
        loss.backward()
    return {"gathered_mib": sum(gathered.values()) / 2**20, "forward_peak_mib": forward / 2**20,
            "forward_backward_peak_mib": counter.peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=8, help="ranks (GPUs)")
    parser.add_argument("--local-batch", type=int, default=64)
    parser.add_argument("--patches", type=int, default=196, help="image tokens (224 px, patch 16: 196)")
    parser.add_argument("--tokens", type=int, default=77, help="text slots (CLIP's context: 77)")
    parser.add_argument("--dim", type=int, default=256, help="FILIP's token dim (paper: 256)")
    args = parser.parse_args()
    rows = []
    for local_loss in (False, True):
        for fraction in (None, 0.25):
            memory = filip_loss_memory(args.world, args.local_batch, args.patches, args.tokens, args.dim, fraction,
                                       local_loss)
            rows.append({"local_loss": local_loss, "token_topk_fraction": fraction, **memory})
            print(f"local_loss={str(local_loss):5} token_topk_fraction={str(fraction):4}  all-gather "
                  f"{memory['gathered_mib']:8.1f} MiB, loss forward peak {memory['forward_peak_mib']:9.1f} MiB, "
                  f"forward+backward peak {memory['forward_backward_peak_mib']:9.1f} MiB per rank", flush=True)
        full, selected = rows[-2:]
        print(f"  0.25 / every token: all-gather {selected['gathered_mib'] / full['gathered_mib']:.2f}x, "
              f"forward+backward peak {selected['forward_backward_peak_mib'] / full['forward_backward_peak_mib']:.2f}x")
    out = Path(__file__).parent / "results" / "filip_token_selection.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({**vars(args), "global_batch": args.world * args.local_batch, "rows": rows},
                              indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
