"""CLIP (Radford et al. 2021): a ViT image tower and a causal text transformer, each pooled to one vector
(image: CLS token; text: the first eos token) and linearly projected into a shared space.

The model is a plain `transformers.CLIPModel`, so a saved directory loads with
`transformers.CLIPModel.from_pretrained(dir)`; clipforge's own keys (family, normalisation) sit beside it in
`clipforge.json`, and `preprocessor_config.json` tells transformers' image processor the same resize and
normalisation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from components.models.base import (
    FORMAT_VERSION,
    LOGIT_SCALE_INIT,
    ContrastiveModel,
    Features,
    apply_overrides,
    check_has_eos,
    check_image_size,
    l2_normalize,
    preset_config,
    token_ids,
)

SIDE_FILE = "clipforge.json"
PREPROCESSOR_FILE = "preprocessor_config.json"


class CLIP(ContrastiveModel):
    family = "clip"
    transformers_model = "CLIPModel"  # the transformers class the whole model is (AltCLIP: AltCLIPModel)

    def __init__(self, model, image_mean=None, image_std=None):
        """model: a transformers.CLIPModel."""
        super().__init__()
        self.model = model
        self.image_size = int(model.config.vision_config.image_size)
        self.max_text_length = int(model.config.text_config.max_position_embeddings)
        self.eos_token_id = pooled_token_id(model.config.text_config)
        self.image_mean = tuple(image_mean or self.default_image_mean)
        self.image_std = tuple(image_std or self.default_image_std)

    @property
    def logit_scale(self) -> torch.nn.Parameter:  # CLIPModel's own parameter: the only one
        return self.model.logit_scale

    @property
    def config(self) -> dict[str, Any]:
        return {"image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "transformers_config": self.model.config.to_dict()}

    # -- building ---------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, preset: str = "tiny", vocab_size: int | None = None, image_size: int | None = None,
              pretrained: str | None = None, *, pad_token_id: int | None = None, bos_token_id: int | None = None,
              eos_token_id: int | None = None, image_mean=None, image_std=None, **overrides) -> CLIP:
        """A randomly initialised CLIP of a preset, or `pretrained` (a hub name or a local directory).

        vocab_size / image_size: the tokenizer's vocabulary and the data's image size (default: the preset's).
        pad/bos/eos_token_id: the tokenizer's special ids (defaults: see base.token_ids); eos is the pooled token.
        overrides: tower config fields (see base.apply_overrides) or projection_dim.
        """
        from transformers import CLIPConfig, CLIPModel

        if pretrained:
            if overrides:
                raise ValueError(f"overrides {sorted(overrides)} cannot change a pretrained model's architecture")
            model = CLIPModel.from_pretrained(pretrained)
            # pad and bos are not checked: the towers never read them (padding is masked, the first token is
            # whatever the tokenizer puts there), and OpenAI's configs carry placeholders (pad 1, bos 0).
            _check_matches(model.config, pretrained, vocab_size=vocab_size, image_size=image_size,
                           eos_token_id=eos_token_id)
            mean, std = _read_normalisation(pretrained)
            return cls(model, image_mean or mean, image_std or std)

        p = preset_config(preset)
        vision, text = p["vision"], p["text"]
        vision["image_size"] = image_size or p["image_size"]
        if vocab_size:
            text["vocab_size"] = vocab_size
        top = {"projection_dim": p["projection_dim"]}
        apply_overrides({"vision": vision, "text": text}, top, overrides)
        text.update(token_ids(text["vocab_size"], pad_token_id, bos_token_id, eos_token_id))
        check_image_size(vision["image_size"], vision["patch_size"])
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=top["projection_dim"],
                            logit_scale_init_value=LOGIT_SCALE_INIT)
        return cls(CLIPModel(config), image_mean, image_std)

    # -- the interface ----------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> Features:
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
        return (l2_normalize(self.model.visual_projection(pooled)),)

    def text_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, D] projected text features before normalisation (AltCLIP's distillation target)."""
        input_ids = batch["input_ids"]
        check_has_eos(input_ids, self.eos_token_id)
        pooled = self.model.text_model(input_ids=input_ids, attention_mask=batch.get("attention_mask")).pooler_output
        return self.model.text_projection(pooled)

    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> Features:
        return (l2_normalize(self.text_features(batch)),)

    def similarity(self, image: Features, text: Features) -> torch.Tensor:
        return image[0] @ text[0].T

    def token_embeddings(self, pixel_values: torch.Tensor, batch: Mapping[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every patch and text token through its tower's pooling-side path (see base.token_embeddings).

        Patches: the vision tower's last hidden states minus CLS, then post_layernorm and visual_projection,
        as the CLS token is pooled. Tokens: the text tower's last hidden states (already final-layer-normed
        inside CLIPTextModel) through text_projection, so the eos row equals embed_text.
        """
        hidden = self.model.vision_model(pixel_values=pixel_values).last_hidden_state  # [B, 1 + P, width]
        patches = l2_normalize(self.model.visual_projection(self.model.vision_model.post_layernorm(hidden[:, 1:])))
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokens = l2_normalize(self.model.text_projection(self.text_token_states(input_ids, attention_mask)))
        mask = attention_mask.to(tokens.dtype)
        return patches, tokens * mask.unsqueeze(-1), mask

    def text_token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L, width] per-token states on the pooling path, just before text_projection."""
        check_has_eos(input_ids, self.eos_token_id)
        return self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # -- persistence: the transformers format + side files ----------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        side = {"family": self.family, "format_version": FORMAT_VERSION,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std)}
        if self.logit_bias is not None:  # SigLIP-trained: CLIPModel has no slot for the bias
            side["logit_bias"] = self.logit_bias.item()
        (directory / SIDE_FILE).write_text(json.dumps(side, indent=2) + "\n")
        (directory / PREPROCESSOR_FILE).write_text(json.dumps(self._preprocessor_config(), indent=2) + "\n")

    def _preprocessor_config(self) -> dict[str, Any]:
        """transformers' CLIPImageProcessor settings: resize the short side, centre-crop, normalise like we do."""
        size = self.image_size
        return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
                "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std), "do_convert_rgb": True}

    @classmethod
    def transformers_class(cls):
        import transformers

        return getattr(transformers, cls.transformers_model)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> CLIP:
        """A directory written by save_pretrained, any transformers CLIP directory, or a hub name."""
        model = cls.transformers_class().from_pretrained(str(directory))
        mean, std = _read_normalisation(directory)
        clip = cls(model, mean, std)
        side = _find_file(directory, SIDE_FILE)
        bias = json.loads(Path(side).read_text()).get("logit_bias") if side else None
        if bias is not None:
            clip.add_logit_bias(bias)
        return clip.eval()


def _read_normalisation(source: str | Path) -> tuple[Any, Any]:
    """(mean, std) from clipforge.json or preprocessor_config.json when there is one; else (None, None)."""
    for name in (SIDE_FILE, PREPROCESSOR_FILE):
        path = _find_file(source, name)
        if path is not None:
            data = json.loads(Path(path).read_text())
            if "image_mean" in data and "image_std" in data:
                return data["image_mean"], data["image_std"]
    return None, None


def _find_file(source: str | Path, name: str) -> str | None:
    local = Path(source) / name
    if local.is_file():
        return str(local)
    if Path(source).exists():
        return None
    try:  # a hub name: the file from the cache or the hub, if it has one
        from transformers.utils import cached_file

        return cached_file(str(source), name, _raise_exceptions_for_missing_entries=False)
    except Exception:  # offline, no such file, no such repo: fall back to the defaults
        return None


def pooled_token_id(text_config) -> int:
    """The token whose state CLIPTextModel pools: eos_token_id, except in a legacy config (eos_token_id 2, as
    OpenAI's checkpoints and the LAION ones converted from open_clip carry it), where transformers pools at
    argmax(input_ids), the vocabulary's last id: <|endoftext|> in OpenAI's layout."""
    eos = int(text_config.eos_token_id)
    return int(text_config.vocab_size) - 1 if eos == 2 else eos


def _check_matches(config, source: str, **wanted: int | None) -> None:
    """Explicit build arguments must agree with the pretrained config (a tokenizer mismatch is silent otherwise)."""
    have = {"vocab_size": config.text_config.vocab_size, "image_size": config.vision_config.image_size,
            "eos_token_id": pooled_token_id(config.text_config)}
    wrong = {k: (v, have[k]) for k, v in wanted.items() if v is not None and v != have[k]}
    if wrong:
        detail = ", ".join(f"{k}={v} (pretrained has {h})" for k, (v, h) in wrong.items())
        raise ValueError(f"pretrained {source}: {detail}")
