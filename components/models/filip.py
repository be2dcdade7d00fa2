"""FILIP (Yao et al. 2021, "Fine-grained Interactive Language-Image Pre-training"): CLIP's two towers, but
matched token by token ("late interaction") instead of through one pooled vector per side.

Features
  encode_image -> (patch_tokens [B, P, d],)          post-layernorm patch states (CLS dropped), projected
                                                     to embed_dim and L2-normalised per token
  encode_text  -> (tokens [B, L, d], mask [B, L])    final-layernorm token states, projected, L2-normalised;
                                                     mask is 1.0 for real tokens, 0.0 for padding (padded
                                                     token vectors are zeroed too); same dtype as tokens

Similarity (`late_interaction`), for image i with patches x_ip and text j with unpadded tokens y_jt:
  s_ij^I = mean_p max_t <x_ip, y_jt>      each patch finds its best-matching word (image-to-text)
  s_ij^T = mean_t max_p <x_ip, y_jt>      each word finds its best-matching patch (text-to-image)
  similarity = (s^I + s^T) / 2            in [-1, 1]
Training (`loss_similarity`) follows the paper: the image-to-text softmax runs over s^I and the text-to-image one
over s^T. Ranking (`similarity`, used by retrieval, zero-shot and prompt ensembles) scores one matrix for both
directions, the symmetric mean: an evaluator then ranks images and texts by the same number, and a single matrix
halves the memory of a large evaluation block.

Token selection (paper, section 3.1.2 "Reduce communication"): with token_topk_fraction = f, the loss calls
`select_tokens(image, text)` on the local features BEFORE all_gather; it keeps, per sample, the ceil(f * P)
patches (ceil(f * L) text slots) whose best similarity to any token of the other modality in the local batch
is highest. Texts keep their mask, so short texts keep all their real tokens and padding stays masked.
With f = None (default) select_tokens is the identity.

Retrieval: `embed_image` / `embed_text` give a pooled vector (mean of the normalised tokens, masked for
text, re-normalised) for fast nearest-neighbour search, but FILIP's retrieval score is the token-wise
`similarity`: evaluators should rank with model.similarity(encode_image(...), encode_text(...)) (or use the
pooled vectors only to shortlist).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components.models.base import (
    LOGIT_SCALE_INIT,
    ContrastiveModel,
    Features,
    apply_overrides,
    check_image_size,
    init_linear,
    l2_normalize,
    preset_config,
    read_config,
    token_ids,
    tower_configs,
)

DEFAULT_EMBED_DIM = 256
# Elements of one chunk of the [images, texts, patches, tokens] similarity tensor (fp32: 256 MiB).
CHUNK_ELEMENTS = 2**26


def _similarity_chunks(image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                       max_elements: int = CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
    """Token similarities [c, n_txt, P, L] for successive chunks of c images, c sized to max_elements."""
    n_img, patches, _ = image_tokens.shape
    n_txt, length, _ = text_tokens.shape
    chunk = max(1, max_elements // max(1, patches * n_txt * length))
    for start in range(0, n_img, chunk):
        yield torch.einsum("ipd,tld->itpl", image_tokens[start:start + chunk], text_tokens)


def similarity_pair(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                    max_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP's (s^I, s^T), each [n_images, n_texts]; see the module docstring.

    Computed in chunks of images so only [chunk, n_texts, P, L] similarities exist at once; max(dim) keeps
    just indices for backward, so memory stays bounded in training too. A text with no real token scores 0.
    """
    valid = text_mask > 0  # [T, L]
    n_valid = valid.sum(-1).clamp(min=1).to(text_tokens.dtype)  # [T]
    pad = ~valid[None, :, None, :]  # [1, T, 1, L]
    image_to_text, text_to_image = [], []
    for sim in _similarity_chunks(image_tokens, text_tokens, max_elements):
        best_token = sim.masked_fill(pad, float("-inf")).max(dim=-1).values  # [c, T, P]
        image_to_text.append(best_token.mean(dim=-1))
        best_patch = sim.max(dim=2).values  # [c, T, L]
        text_to_image.append((best_patch * valid).sum(dim=-1) / n_valid)
    s_image = torch.cat(image_to_text)
    s_text = torch.cat(text_to_image)
    s_image = torch.where(valid.any(dim=-1)[None], s_image, torch.zeros_like(s_image))
    return s_image, s_text


def late_interaction(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                     max_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """(s^I + s^T) / 2: FILIP's symmetric token-wise similarity, [n_images, n_texts]."""
    s_image, s_text = similarity_pair(image_tokens, text_tokens, text_mask, max_elements)
    return (s_image + s_text) / 2


def masked_mean_embedding(tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of L2-normalised tokens over the unmasked positions, re-normalised: [B, d]."""
    if mask is None:
        return l2_normalize(tokens.mean(dim=1))
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return l2_normalize((tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1))


class FILIP(ContrastiveModel):
    family = "filip"
    # select_tokens keeps ceil(f * L) text slots of the padded length L, and every rank's tokens must have one
    # shape for the all-gather.
    fixed_text_length = True

    def __init__(self, config: dict[str, Any]):
        from transformers import CLIPTextModel, CLIPVisionModel

        super().__init__()
        vision_config, text_config = tower_configs(config)
        self.config = {
            "vision_config": vision_config.to_diff_dict(), "text_config": text_config.to_diff_dict(),
            "embed_dim": int(config.get("embed_dim") or DEFAULT_EMBED_DIM),
            "token_topk_fraction": config.get("token_topk_fraction"),
            "image_mean": list(config.get("image_mean") or self.default_image_mean),
            "image_std": list(config.get("image_std") or self.default_image_std),
        }
        embed_dim = self.config["embed_dim"]
        self.vision = CLIPVisionModel(vision_config)
        self.text = CLIPTextModel(text_config)
        self.image_projection = init_linear(nn.Linear(vision_config.hidden_size, embed_dim, bias=False),
                                            vision_config.hidden_size**-0.5)
        self.text_projection = init_linear(nn.Linear(text_config.hidden_size, embed_dim, bias=False),
                                           text_config.hidden_size**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.embed_dim = embed_dim
        self.token_topk_fraction = self.config["token_topk_fraction"]
        self.image_size = int(vision_config.image_size)
        self.max_text_length = int(text_config.max_position_embeddings)
        self.image_mean = tuple(self.config["image_mean"])
        self.image_std = tuple(self.config["image_std"])

    # -- building ---------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, preset: str = "tiny", vocab_size: int | None = None, image_size: int | None = None,
              pretrained: str | None = None, *, embed_dim: int = DEFAULT_EMBED_DIM,
              token_topk_fraction: float | None = None, pad_token_id: int | None = None,
              bos_token_id: int | None = None, eos_token_id: int | None = None, image_mean=None, image_std=None,
              **overrides) -> FILIP:
        """A randomly initialised FILIP of a preset.

        pretrained: a directory saved by FILIP.save_pretrained (loaded as is), or a transformers CLIP (hub name
        or directory) whose towers initialise ours; the token projections start random either way.
        Other arguments: as CLIP.build; embed_dim is the token embedding size (the paper uses 256).
        """
        if token_topk_fraction is not None and not 0 < token_topk_fraction <= 1:
            raise ValueError(f"token_topk_fraction must be in (0, 1], got {token_topk_fraction}")
        if pretrained and (Path(pretrained) / "config.json").is_file() and \
                read_config(pretrained).get("family") == cls.family:
            if overrides:
                raise ValueError(f"overrides {sorted(overrides)} cannot change a pretrained model's architecture")
            return cls.from_pretrained(pretrained)
        if pretrained:
            return cls._from_clip(pretrained, embed_dim, token_topk_fraction, image_mean, image_std, overrides)

        p = preset_config(preset)
        vision, text = p["vision"], p["text"]
        vision["image_size"] = image_size or p["image_size"]
        if vocab_size:
            text["vocab_size"] = vocab_size
        top = {"embed_dim": embed_dim}
        apply_overrides({"vision": vision, "text": text}, top, overrides)
        text.update(token_ids(text["vocab_size"], pad_token_id, bos_token_id, eos_token_id))
        check_image_size(vision["image_size"], vision["patch_size"])
        return cls({"vision_config": vision, "text_config": text, "embed_dim": top["embed_dim"],
                    "token_topk_fraction": token_topk_fraction, "image_mean": image_mean, "image_std": image_std})

    @classmethod
    def _from_clip(cls, pretrained, embed_dim, token_topk_fraction, image_mean, image_std, overrides) -> FILIP:
        from transformers import CLIPModel

        if overrides:
            raise ValueError(f"overrides {sorted(overrides)} cannot change a pretrained model's architecture")
        clip = CLIPModel.from_pretrained(pretrained)
        model = cls({"vision_config": clip.config.vision_config.to_diff_dict(),
                     "text_config": clip.config.text_config.to_dict(), "embed_dim": embed_dim,
                     "token_topk_fraction": token_topk_fraction, "image_mean": image_mean, "image_std": image_std})
        model.vision.load_state_dict(clip.vision_model.state_dict())
        model.text.load_state_dict(clip.text_model.state_dict())
        with torch.no_grad():
            model.logit_scale.copy_(clip.logit_scale)
        return model

    # -- the interface ----------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> Features:
        hidden = self.vision(pixel_values=pixel_values).last_hidden_state  # [B, 1 + P, width]
        patches = self.vision.post_layernorm(hidden[:, 1:])
        return (l2_normalize(self.image_projection(patches)),)

    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> Features:
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        tokens = l2_normalize(self.text_projection(hidden))
        mask = attention_mask.to(tokens.dtype)
        return tokens * mask.unsqueeze(-1), mask

    def similarity(self, image: Features, text: Features) -> torch.Tensor:
        return late_interaction(image[0], text[0], text[1])

    def loss_similarity(self, image: Features, text: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """(s^I, s^T): the paper's loss takes the image-to-text softmax over s^I and the text-to-image one over s^T."""
        return similarity_pair(image[0], text[0], text[1])

    def token_embeddings(self, pixel_values: torch.Tensor, batch: Mapping[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FILIP's features are already per token (CLS dropped, projected, normalised, padding zeroed)."""
        (patches,), (tokens, mask) = self.encode_image(pixel_values), self.encode_text(batch)
        return patches, tokens, mask

    def image_embedding(self, image: Features) -> torch.Tensor:
        return masked_mean_embedding(image[0])

    def text_embedding(self, text: Features) -> torch.Tensor:
        return masked_mean_embedding(text[0], text[1])

    def class_scores(self, image: Features, class_texts: Features, templates: int) -> torch.Tensor:
        """Token-wise features cannot be averaged across prompts: the ensemble averages the similarities."""
        scores = self.similarity(image, class_texts)
        return scores.reshape(scores.shape[0], -1, templates).mean(dim=-1)

    # -- FILIP's token selection for the loss ------------------------------------------------------------------
    def select_tokens(self, image: Features, text: Features,
                      fraction: float | None = None) -> tuple[Features, Features]:
        """Keep the top `fraction` (default: token_topk_fraction) of each sample's tokens; identity when unset.

        Call on the LOCAL features before all_gather. A token's score is its best similarity to any real
        token of the other modality in the local batch; selection has no gradient, the kept tokens do.
        Image keeps ceil(f * P) patches; text keeps ceil(f * L) slots with their mask (padding ranks last).
        """
        fraction = self.token_topk_fraction if fraction is None else fraction
        if not fraction or fraction >= 1:
            return image, text
        (patches,), (tokens, mask) = image, text
        valid = mask > 0
        with torch.no_grad():
            patch_score = []
            token_score = torch.full(mask.shape, float("-inf"), device=tokens.device, dtype=tokens.dtype)
            pad = ~valid[None, :, None, :]
            for sim in _similarity_chunks(patches, tokens):  # [c, T, P, L]
                patch_score.append(sim.masked_fill(pad, float("-inf")).amax(dim=(1, 3)))  # [c, P]
                token_score = torch.maximum(token_score, sim.amax(dim=(0, 2)))  # [T, L]
            patch_score = torch.cat(patch_score)
            token_score = token_score.masked_fill(~valid, float("-inf"))
            keep_patches = patch_score.topk(max(1, math.ceil(fraction * patches.shape[1])), dim=1).indices
            keep_tokens = token_score.topk(max(1, math.ceil(fraction * tokens.shape[1])), dim=1).indices
        patches = patches.gather(1, keep_patches.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        tokens = tokens.gather(1, keep_tokens.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return (patches,), (tokens, mask.gather(1, keep_tokens))
