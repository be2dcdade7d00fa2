"""CLIPPO (Tschannen et al. 2022, "Image-and-Language Understanding from Pixels Only"): ONE ViT encodes both
images and captions rendered as images, so there is no tokenizer and no text tower.

Its text processor is `RenderedText` (components/models/text.py): captions drawn with GNU Unifont, black on
white, characters wrapped to lines like big_vision's `render_unifont` (components/models/unifont.py);
encode_text reads them as batch["text_pixels"], normalised exactly like images. Both sides share the patch
embedding, the transformer, the pooling and one linear projection; embeddings are L2-normalised, similarity is
their dot product.

text_image_size may differ from image_size (both multiples of the patch size): the shared ViT then
interpolates its position embeddings for the other size. font_size is stored with the model so the data
pipeline and evaluators render captions the way the model was trained. text_pair_fraction (the YAML knob
for big_vision's text/text pairs) belongs to the data pipeline; the model ignores it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components.models.base import (
    HALF_MEAN,
    HALF_STD,
    LOGIT_SCALE_INIT,
    ContrastiveModel,
    Features,
    apply_overrides,
    check_image_size,
    init_linear,
    l2_normalize,
    normalize_pixels,
    preset_config,
    read_config,
    tower_configs,
)
from components.models.text import RenderedText, text_ids
from components.models.unifont import DEFAULT_FONT_SIZE

# Smallest patch of a randomly initialised tower. Unifont lines are 16 px high and the `tiny` preset's 8 px
# patches cut each one in two: with 16 px patches a tiny CLIPPO learns more per step and each step costs 3.7x less
# (benchmarks/clippo_patch_size.py: after 300 steps loss 3.53 vs 4.30, training pairs retrieved at R@5 0.20 vs
# 0.09). The other presets already use 16 px patches; `overrides` can still set any size.
MIN_PATCH_SIZE = 16
# Pooling of the shared tower. "gap" (mean of patch tokens) for models trained here: at random init the CLS
# output barely depends on the input, and with one tower for both sides every image and every rendered
# caption then embed alike, so the contrastive loss sits at log(batch) and never moves (measured on the
# built-in corpus). "cls" keeps a transformers CLIP vision tower's own trained pooling.
POOLS = ("gap", "cls")


class CLIPPO(ContrastiveModel):
    family = "clippo"
    uses_tokenizer = False
    default_image_mean = HALF_MEAN  # big_vision: pixels to [-1, 1]
    default_image_std = HALF_STD
    data_knobs = ("text_pair_fraction",)

    def __init__(self, config: dict[str, Any]):
        from transformers import CLIPVisionModel

        super().__init__()
        vision_config, _ = tower_configs(config)
        self.config = {
            "vision_config": vision_config.to_diff_dict(),
            "projection_dim": int(config["projection_dim"]),
            "text_image_size": int(config.get("text_image_size") or vision_config.image_size),
            "font_size": int(config.get("font_size") or DEFAULT_FONT_SIZE),
            "pool": config.get("pool") or "gap",
            "image_mean": list(config.get("image_mean") or self.default_image_mean),
            "image_std": list(config.get("image_std") or self.default_image_std),
        }
        check_image_size(self.config["text_image_size"], vision_config.patch_size)
        self.vision = CLIPVisionModel(vision_config)
        self.projection = init_linear(nn.Linear(vision_config.hidden_size, self.config["projection_dim"], bias=False),
                                      vision_config.hidden_size**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.image_size = int(vision_config.image_size)
        self.text_image_size = self.config["text_image_size"]
        self.font_size = self.config["font_size"]
        if self.config["pool"] not in POOLS:
            raise ValueError(f"clippo pool must be one of {POOLS}, got {self.config['pool']!r}")
        self.pool = self.config["pool"]
        self.image_mean = tuple(self.config["image_mean"])
        self.image_std = tuple(self.config["image_std"])

    # -- building ---------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, preset: str = "tiny", vocab_size: int | None = None, image_size: int | None = None,
              pretrained: str | None = None, *, text_image_size: int | None = None,
              font_size: int = DEFAULT_FONT_SIZE, pool: str | None = None, image_mean=None, image_std=None,
              **overrides) -> CLIPPO:
        """A randomly initialised CLIPPO with the preset's image tower (its text tower is unused).

        vocab_size: ignored (no tokenizer). text_image_size: size of rendered captions (default image_size).
        pretrained: a directory saved by CLIPPO.save_pretrained, or a transformers CLIP (hub name or
        directory) whose vision tower and visual projection initialise ours.
        overrides: vision config fields (bare or vision_config: {...}) or projection_dim.
        """
        if pretrained and (Path(pretrained) / "config.json").is_file() and \
                read_config(pretrained).get("family") == cls.family:
            if overrides:
                raise ValueError(f"overrides {sorted(overrides)} cannot change a pretrained model's architecture")
            return cls.from_pretrained(pretrained)
        knobs = {"text_image_size": text_image_size, "font_size": font_size, "pool": pool, "image_mean": image_mean,
                 "image_std": image_std}
        if pretrained:
            return cls._from_clip(pretrained, knobs, overrides)

        p = preset_config(preset)
        vision = p["vision"]
        vision["patch_size"] = max(vision["patch_size"], MIN_PATCH_SIZE)
        vision["image_size"] = image_size or p["image_size"]
        top = {"projection_dim": p["projection_dim"]}
        apply_overrides({"vision": vision}, top, overrides)
        check_image_size(vision["image_size"], vision["patch_size"])
        return cls({"vision_config": vision, "projection_dim": top["projection_dim"], **knobs})

    @classmethod
    def _from_clip(cls, pretrained: str, knobs: dict[str, Any], overrides: Mapping[str, Any]) -> CLIPPO:
        from transformers import CLIPModel

        if overrides:
            raise ValueError(f"overrides {sorted(overrides)} cannot change a pretrained model's architecture")
        clip = CLIPModel.from_pretrained(pretrained)
        model = cls({"vision_config": clip.config.vision_config.to_diff_dict(),
                     "projection_dim": clip.config.projection_dim, **knobs, "pool": knobs["pool"] or "cls"})
        model.vision.load_state_dict(clip.vision_model.state_dict())
        model.projection.load_state_dict(clip.visual_projection.state_dict())
        with torch.no_grad():
            model.logit_scale.copy_(clip.logit_scale)
        return model

    # -- the interface ----------------------------------------------------------------------------------------
    def _embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        other_size = pixel_values.shape[-1] != self.image_size or pixel_values.shape[-2] != self.image_size
        output = self.vision(pixel_values=pixel_values, interpolate_pos_encoding=other_size)
        if self.pool == "cls":
            pooled = output.pooler_output
        else:  # "gap": mean over patch tokens, then the tower's final layernorm
            pooled = self.vision.post_layernorm(output.last_hidden_state[:, 1:].mean(dim=1))
        return l2_normalize(self.projection(pooled))

    def encode_image(self, pixel_values: torch.Tensor) -> Features:
        return (self._embed_pixels(pixel_values),)

    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> Features:
        return (self._embed_pixels(batch["text_pixels"]),)

    def similarity(self, image: Features, text: Features) -> torch.Tensor:
        return image[0] @ text[0].T

    # -- text input: captions rendered with Unifont ------------------------------------------------------------
    def text_processor(self, tokenizer=None) -> RenderedText:
        return RenderedText(self.text_image_size, self.font_size)

    def text_batch(self, arrays: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
                   ) -> dict[str, torch.Tensor]:
        return {"text_pixels": normalize_pixels(arrays["text_pixels"], self.image_mean, self.image_std, dtype)}

    def text_identity(self, arrays: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return text_ids(arrays["text_pixels"])
