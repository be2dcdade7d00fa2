"""Which image patches each word of a caption lands on: per-token patch-similarity maps, as in FILIP's
word-patch alignment figures (Yao et al. 2021, figure 5), for any model whose `token_embeddings` gives
patch and token embeddings in the shared space (CLIP, FILIP; CLIPPO has no text tokens).

    indices, maps = alignment_maps(model, pixel_values, text_batch, grid=model.image_size // patch_size)
    keep = torch.zeros_like(text_batch["input_ids"][0]); keep[indices] = 1
    image = plots.alignment_map_figure(image_bytes, token_strings(tokenizer, text_batch["input_ids"][0], keep), maps)

A map is the plain cosine similarity of the token to every patch (no softmax over patches or tokens, so a
token that matches nothing does not get its mass spread anyway), min-max normalised per token for display.
For CLIP, which is trained on pooled vectors only, such maps are known to be noisy; FILIP trains them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch

from components.models.base import ContrastiveModel


def text_special_ids(model: ContrastiveModel) -> set[int]:
    """bos / eos / pad ids of the model's text tower (its CLIPTextConfig): the positions no map is drawn for."""
    from transformers import CLIPTextConfig

    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, CLIPTextConfig):
            ids = (config.bos_token_id, config.eos_token_id, config.pad_token_id)
            return {int(i) for i in ids if i is not None}
    raise ValueError(f"{type(model).__name__} has no CLIP text tower config: pass special_token_ids explicitly")


@torch.no_grad()
def alignment_maps(model: ContrastiveModel, pixel_values: torch.Tensor, text_batch: Mapping[str, torch.Tensor],
                   grid: int | None = None, special_token_ids: Collection[int] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(token_indices [n], maps [n, grid, grid]) for one image ([1, 3, H, W]) and one caption (a tokenized
    batch of one row).

    token_indices: positions in input_ids[0] of the tokens that get a map, i.e. the unpadded ones that are
    not special (default: the text tower's bos/eos/pad ids). maps[i]: cosine similarity of that token to each
    patch in row-major grid order, min-max normalised to [0, 1] (all zeros when every patch scores the same).
    Runs the model as it is (call model.eval() first), on the device of pixel_values.
    """
    if pixel_values.shape[0] != 1 or any(v.shape[0] != 1 for v in text_batch.values()):
        raise ValueError("alignment_maps takes one image and one caption (batches of 1)")
    patches, tokens, mask = model.token_embeddings(pixel_values, text_batch)  # NotImplementedError: no tokens
    grid = grid or round(patches.shape[1] ** 0.5)  # default: a square ViT patch grid
    if patches.shape[1] != grid * grid:
        raise ValueError(f"the model gives {patches.shape[1]} patches, not a {grid}x{grid} grid")
    specials = text_special_ids(model) if special_token_ids is None else special_token_ids
    input_ids = text_batch["input_ids"][0].to(mask.device)
    special = torch.isin(input_ids, torch.tensor(sorted(specials), dtype=input_ids.dtype, device=mask.device))
    token_indices = torch.nonzero((mask[0] > 0) & ~special).flatten()
    similarity = (tokens[0, token_indices] @ patches[0].T).float()  # [n, P]
    low = similarity.min(dim=1, keepdim=True).values
    span = similarity.max(dim=1, keepdim=True).values - low
    normalised = torch.where(span > 0, (similarity - low) / span.clamp(min=1e-12), torch.zeros_like(similarity))
    maps = normalised.reshape(-1, grid, grid)
    return token_indices.cpu().numpy(), maps.cpu().numpy()


def token_strings(tokenizer, input_ids: Sequence[int] | torch.Tensor,
                  mask: Sequence[int] | torch.Tensor | None = None) -> list[str]:
    """The text piece of each token of one row whose mask is non-zero (every token when mask is None).

    Byte-level BPE tokens carry 'Ġ' for a leading space; the tokenizer's own decoder turns each token back
    into text (which also handles CLIP's '</w>' and SentencePiece's '▁'), and surrounding spaces are dropped.
    A piece holding part of a multi-byte character decodes to '\ufffd'.
    """
    ids = [int(i) for i in (input_ids.tolist() if torch.is_tensor(input_ids) else input_ids)]
    if mask is not None:
        keep = mask.tolist() if torch.is_tensor(mask) else list(mask)
        if len(keep) != len(ids):
            raise ValueError(f"mask has {len(keep)} entries for {len(ids)} tokens")
        ids = [i for i, k in zip(ids, keep) if k]
    pieces = []
    for token in tokenizer.convert_ids_to_tokens(ids):
        try:
            piece = tokenizer.convert_tokens_to_string([token])
        except Exception:  # a tokenizer without a decoder for single tokens: drop the byte-level space marker
            piece = token.replace("Ġ", " ")
        pieces.append(piece.strip())
    return pieces
