"""Memory of the contrastive loss on one rank at a large global batch, from the code's own shapes.

    python benchmarks/contrastive_loss_memory.py                     # 32k global batch: 256 ranks x 128
    python benchmarks/contrastive_loss_memory.py --world 1024 --local-batch 32 --dim 768

Runs components/train/losses.ContrastiveLoss forward and backward for rank 0 of a `--world`-rank job on
PyTorch's meta device (shapes and dtypes only: no memory is allocated and nothing is computed, so a 32k x 32k
logits matrix costs nothing here). The all-gather is replaced by tiling the local features `world` times,
which gives the gathered tensors exactly the shapes the real gather produces. A dispatch mode counts the
bytes of every tensor the loss creates while it is alive (freed when Python drops it), so the peak is the
loss's own working memory on top of the model: what decides whether `trainer.loss.local_loss` must be on.
Results go to benchmarks/results/contrastive_loss_memory.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import components.train.losses as losses  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created under this mode that are alive at the same time."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and not tensor._is_view():
                size = tensor.untyped_storage().nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def loss_memory(world: int, local_batch: int, dim: int, kind: str, local_loss: bool) -> dict[str, float]:
    losses.dist_rank_world = lambda: (0, world)
    losses.gather_features = lambda features, with_grad=True: tuple(
        t.repeat(world, *[1] * (t.dim() - 1)) for t in features)
    loss_fn = losses.ContrastiveLoss(kind=kind, local_loss=local_loss)
    image = torch.randn(local_batch, dim, device="meta", requires_grad=True)
    text = torch.randn(local_batch, dim, device="meta", requires_grad=True)
    scale = torch.zeros((), device="meta", requires_grad=True)
    bias = torch.zeros((), device="meta", requires_grad=True) if kind == "siglip" else None
    with LiveBytes() as counter:
        loss = loss_fn((image,), (text,), lambda a, b: a[0] @ b[0].T, scale, bias)
        forward = counter.peak
        loss.backward()
    return {"forward_peak_mib": forward / 2**20, "forward_backward_peak_mib": counter.peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=256, help="ranks (GPUs)")
    parser.add_argument("--local-batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512, help="embedding dim (base preset: 512)")
    args = parser.parse_args()
    global_batch = args.world * args.local_batch
    rows = []
    for kind in ("infonce", "siglip"):
        for local in (False, True):
            memory = loss_memory(args.world, args.local_batch, args.dim, kind, local)
            rows.append({"kind": kind, "local_loss": local, **memory})
            print(f"{kind:8} local_loss={str(local):5}  global batch {global_batch:,}: forward peak "
                  f"{memory['forward_peak_mib']:9.1f} MiB, forward+backward peak "
                  f"{memory['forward_backward_peak_mib']:9.1f} MiB per rank", flush=True)
    out = Path(__file__).parent / "results" / "contrastive_loss_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"world": args.world, "local_batch": args.local_batch, "dim": args.dim,
                               "global_batch": global_batch, "rows": rows}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
