"""Contrastive losses for the CLIP family: symmetric InfoNCE (CLIP) and SigLIP's sigmoid loss, over the global batch.

A model supplies `Features` (a tuple of tensors, batch on dim 0) for images and for texts, a `similarity(image, text)`
callable giving the unscaled [n_img, n_txt] matrix, and a `logit_scale` parameter holding the *log* of the scale.
The loss never looks inside the features, so dual encoders (CLIP: `(emb[B, D],)`) and late-interaction models
(FILIP: image `(tokens[B, P, d],)`, text `(tokens[B, L, d], mask[B, L])`) go through the same code.

Direction-specific similarities: `similarity` may instead return a pair (image-to-text, text-to-image), both
[n_img, n_txt]. InfoNCE then takes the image rows' softmax over the first and the text rows' softmax over the
second: FILIP's loss (Yao et al. 2021, eq. 4-5) uses s^I for image-to-text and s^T for text-to-image. SigLIP has no
direction (one sigmoid per pair), so it scores a pair with the mean of the two, FILIP's symmetric similarity.

Scale and bias
- `scale = logit_scale.exp().clamp(max=max_logit_scale)`; CLIP clamps at 100 (the default) so the temperature
  cannot collapse. At the clamp the scale's gradient is zero. Initialising it is the model's job: CLIP uses
  `logit_scale = log(1 / 0.07)`; SigLIP uses `logit_scale = log(10)` and `logit_bias = -10` (the bias starts the
  sigmoid near the prior that almost every pair is a negative).
- InfoNCE ignores `logit_bias` (softmax cross-entropy is invariant to a constant shift); SigLIP requires it.
- Logits below float32 (bf16/fp16) are upcast to float32 for the loss; float64 stays float64.

Distributed: why W workers with gradients averaged (DDP / DeepSpeed) match one process over the whole batch.
Let the global batch be N = W * B, rank r holding rows [rB, (r+1)B), L the single-process loss, L_r the loss rank r
computes and f_r its local features. After backward, rank r's tower gradient is sum_k dL_k/df_r * df_r/dθ: its own
loss reaches f_r directly, and every other rank's loss reaches it through the backward of the differentiable
all_gather (a reduce-scatter with SUM; implemented here, see `_AllGatherWithGrad` for why not torch's). Averaging
over ranks gives (1/W) sum_r sum_k dL_k/df_r df_r/dθ = (1/W) sum_k dL_k/dθ = d(mean_k L_k)/dθ. The logit
scale/bias are used directly on every rank, and their averaged gradient is again d(mean_k L_k)/d(scale).
So averaged gradients are exact whenever mean_k L_k == L:
- local_loss=False: every rank computes the full N x N loss, L_k = L for all k, so mean_k L_k = L (and every rank
  reports the same value). Cost: N^2 similarities per rank.
- local_loss=True (InfoNCE): L_r = (mean CE over rank r's B image rows of [B, N] + mean CE over its B text rows of
  [B, N]) / 2, labels at the rank offset. The N image rows and N text rows of the global matrix are partitioned
  over ranks with equal B, so mean_r L_r = L. The per-rank value differs; the all-reduced mean equals L.
  Cost: 2 B N similarities per rank.
- SigLIP: L = -(1/N) sum_i sum_j log sigmoid(z_ij (scale s_ij + bias)) (sum over texts, mean over images, as in
  Zhai et al. 2023) is a mean over image rows, so with local_loss=True each rank takes its B image rows against
  all N texts (positives at column rB + i) and mean_r L_r = L; with local_loss=False every rank computes all of it.
Without gradients through the gather (gather_with_grad=False, open_clip's fallback: plain all_gather with the
local slice swapped back for the local, grad-carrying tensor) rank r only gets dL_r/df_r. For the global loss this
is dL/df_r, so the averaged tower gradients are exactly 1/W of the right ones (the scale's is still right); for the
local loss the cross terms dL_k/df_r (k != r) are simply lost (for SigLIP's local loss only on the text side: other
ranks never see this rank's images). Hence gather_with_grad=True is the default; the tests show both failures.

Duplicate captions (`duplicate_positives=True`; not in CLIP's formula). CLIP's InfoNCE takes every other pair of
the batch as a negative. When two rows carry the same caption (the built-in corpus gives both art styles of a
concept one caption; web data repeats stock captions), that pushes each image away from its own caption's twin.
With the option, each row's target is spread evenly over every column whose caption equals its own (UniCL's
label-based targets, Yang et al. 2022): q_ij = [c_i = c_j] / |{k : c_k = c_i}|, loss -sum_j q_ij log p_ij, in both
directions; SigLIP labels such pairs +1. Without duplicates q is the identity and the loss is CLIP's exactly.
Captions are compared by `caption_ids` (an int64 per row, equal for equal captions: the model's
`text_identity`), gathered with the features. Where it matters: equal captions embed equally, so under InfoNCE a
twin's logit equals the row's own, and spreading the target over both gives the same loss and the same gradient as
CLIP's (the softmax already splits the mass evenly between them); the option changes SigLIP, where each pair is
scored alone and the twin was a -1 pair. Measured on the built-in corpus with InfoNCE: no effect beyond run-to-run
noise (BENCHMARKS.md).

Equal local batch sizes are required (and so equal token counts P, L for token features: pad them): all_gather
needs equal shapes, and the local-loss labels use the offset r * B. `gather_features` checks the shapes across
ranks with two tiny extra all_gathers of ints and raises a ValueError naming them, rather than hanging or reading
garbage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

Features = tuple[Tensor, ...]
# One [n_img, n_txt] matrix for both directions, or (image-to-text, text-to-image) matrices.
Similarity = Callable[[Features, Features], Tensor | tuple[Tensor, Tensor]]

KINDS = ("infonce", "siglip")


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_same_shapes(features: Features, world: int) -> None:
    """Raise ValueError on every rank unless every rank holds tensors of the same shapes."""
    dims = [t.dim() for t in features]
    local = torch.tensor([len(features), *dims, *(s for t in features for s in t.shape)],
                         dtype=torch.int64, device=features[0].device)
    sizes = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    if any(int(s) != local.numel() for s in all_sizes):
        raise ValueError(f"gather_features: ranks disagree on the number/rank of feature tensors "
                         f"(descriptor lengths {[int(s) for s in all_sizes]})")
    everyone = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(everyone, local)
    if not all(torch.equal(e, local) for e in everyone):
        raise ValueError(f"gather_features needs the same feature shapes on every rank (equal local batch size, "
                         f"padded token counts); got per rank {[_decode_shapes(e) for e in everyone]}")


def _decode_shapes(descriptor: Tensor) -> list[tuple[int, ...]]:
    values = [int(v) for v in descriptor]
    n = values[0]
    dims, flat = values[1:1 + n], values[1 + n:]
    shapes, at = [], 0
    for d in dims:
        shapes.append(tuple(flat[at:at + d]))
        at += d
    return shapes


# torch 2.13 names; older torch spells them all_gather_into_tensor / reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_dim0(tensor: Tensor) -> Tensor:
    """[B, ...] on each rank -> [W * B, ...] in rank order, without autograd."""
    tensor = tensor.detach().contiguous()
    out = tensor.new_empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather on dim 0 whose backward reduce-scatters (SUM): each rank's slice receives the sum over ranks of
    the gradient every rank's loss put on it.

    Not `torch.distributed.nn.functional.all_gather`: it is deprecated in torch 2.13, and on gloo its backward
    (an all-to-all built from `dist.scatter` into `empty_like(grad)` buffers, which keep a non-contiguous gradient's
    strides) silently permutes the gradient whenever the incoming gradient is not contiguous, e.g. token features
    behind an einsum (gloo scatter and non-contiguous tensors: pytorch/pytorch#24836, #192920). Here the gradient is
    made contiguous and reduce-scattered in one collective (gloo and NCCL both support it).
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        return _all_gather_dim0(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))
        _reduce_scatter_single(out, grad)
        return out


def gather_features(features: Features, gather_with_grad: bool = True) -> Features:
    """Concatenate each tensor of `features` over the ranks of the default process group (rank order, dim 0).

    gather_with_grad=True: a differentiable all_gather whose backward sums every rank's gradient for a slice back
    onto the rank that produced it (`_AllGatherWithGrad`). False: plain all_gather (no gradient) with this rank's
    slice replaced by the local tensor, so only the local loss's gradient reaches the local features (open_clip's
    fallback). Non-floating tensors (masks, ids) are always gathered without grad. Identity (the same tuple) when
    not distributed or world size 1. All ranks must hold the same shapes (checked; ValueError otherwise).
    """
    rank, world = dist_rank_world()
    if world == 1:
        return features
    _check_same_shapes(features, world)
    out = []
    for t in features:
        if gather_with_grad and t.is_floating_point():
            out.append(_AllGatherWithGrad.apply(t))
        else:
            everyone = _all_gather_dim0(t)
            n = t.shape[0]
            out.append(torch.cat([everyone[:rank * n], t, everyone[(rank + 1) * n:]]))
    return tuple(out)


def _loss_dtype(logits: Tensor) -> Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class ContrastiveLoss(torch.nn.Module):
    """Symmetric InfoNCE over the global batch (CLIP), or SigLIP's sigmoid loss.

    kind: "infonce" | "siglip". local_loss: each rank scores only its own rows against the gathered batch (cheaper;
    the all-reduced mean over ranks is the global loss) instead of every rank computing the full global loss.
    gather_with_grad: see `gather_features`; keep True for exact gradients. max_logit_scale: clamp on
    exp(logit_scale) (100, as in CLIP). duplicate_positives: rows with equal `caption_ids` are each other's
    positives (see the module docstring). See the module docstring for why both settings give exact gradients.
    """

    def __init__(self, kind: str = "infonce", local_loss: bool = False, gather_with_grad: bool = True,
                 max_logit_scale: float = 100.0, duplicate_positives: bool = False):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
        for name, value in (("local_loss", local_loss), ("gather_with_grad", gather_with_grad),
                            ("duplicate_positives", duplicate_positives)):
            if not isinstance(value, bool):
                raise ValueError(f"loss.{name} must be true or false, got {value!r}")
        self.kind = kind
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.max_logit_scale = max_logit_scale
        self.duplicate_positives = duplicate_positives

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
                f"max_logit_scale={self.max_logit_scale}, duplicate_positives={self.duplicate_positives}")

    def forward(self, image: Features, text: Features, similarity: Similarity, logit_scale: Tensor,
                logit_bias: Tensor | None = None, caption_ids: Tensor | None = None) -> Tensor:
        n_local = image[0].shape[0]
        if text[0].shape[0] != n_local:
            raise ValueError(f"image batch {n_local} != text batch {text[0].shape[0]}: pairs must align")
        if self.kind == "siglip" and logit_bias is None:
            raise ValueError("siglip needs logit_bias (a model parameter; init -10 with logit_scale init log(10))")
        if self.duplicate_positives and (caption_ids is None or tuple(caption_ids.shape) != (n_local,)):
            raise ValueError(f"duplicate_positives needs caption_ids, one per row ({n_local})")
        scale = logit_scale.exp().clamp(max=self.max_logit_scale)
        rank, world = dist_rank_world()
        if world > 1:
            all_image = gather_features(image, self.gather_with_grad)
            all_text = gather_features(text, self.gather_with_grad)
        else:
            all_image, all_text = image, text
        n_all = all_image[0].shape[0]
        local = self.local_loss and world > 1
        positives = None  # [rows, columns] bool when duplicates count: the rows' ids against the columns'
        if self.duplicate_positives:
            all_ids = _all_gather_dim0(caption_ids) if world > 1 else caption_ids
            positives = (caption_ids if local else all_ids)[:, None] == all_ids[None, :]

        def scores(img: Features, txt: Features) -> tuple[Tensor, Tensor]:
            """(image-to-text, text-to-image) similarities, each [n_img, n_txt]."""
            pair = similarity(img, txt)
            pair = pair if isinstance(pair, tuple) else (pair, pair)
            expected = (img[0].shape[0], txt[0].shape[0])
            for s in pair:
                if tuple(s.shape) != expected:
                    raise ValueError(f"similarity returned shape {tuple(s.shape)}, expected {expected}")
            return _loss_dtype(pair[0]), _loss_dtype(pair[1])

        if self.kind == "infonce":
            if local:
                logits_per_image = scale * scores(image, all_text)[0]  # [B, N]
                logits_per_text = scale * scores(all_image, text)[1].T  # [B, N]
                labels = torch.arange(n_local, device=logits_per_image.device) + rank * n_local
            else:
                image_to_text, text_to_image = scores(all_image, all_text)  # [N, N] each
                logits_per_image, logits_per_text = scale * image_to_text, scale * text_to_image.T
                labels = torch.arange(n_all, device=logits_per_image.device)
            if positives is not None:  # targets spread over each row's duplicates (the relation is symmetric)
                labels = positives.to(logits_per_image.dtype)
                labels = labels / labels.sum(dim=1, keepdim=True)
            return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

        def symmetric(img: Features, txt: Features) -> Tensor:
            image_to_text, text_to_image = scores(img, txt)
            return (image_to_text + text_to_image) / 2  # exactly the one matrix when both directions share it

        # siglip: rows are images; positives on the diagonal (shifted to this rank's columns for the local loss)
        if local:
            logits = scale * symmetric(image, all_text) + logit_bias  # [B, N]
            offset = rank * n_local
        else:
            logits = scale * symmetric(all_image, all_text) + logit_bias  # [N, N]
            offset = 0
        rows = logits.shape[0]
        signs = -torch.ones_like(logits)
        idx = torch.arange(rows, device=logits.device)
        signs[idx, idx + offset] = 1.0
        if positives is not None:
            signs[positives] = 1.0
        return -F.logsigmoid(signs * logits).sum(dim=1).mean()
