"""Models by name: `build_model("filip", "tiny", vocab_size=..., embed_dim=256)`, `load_model(directory)`, and
`load_model_and_text(directory)`: a saved model with its text processor (tokenizer or Unifont renderer), as
open_clip's `create_model_and_transforms` and `get_tokenizer` pair them.

Families are classes (one file each); presets are data (base.PRESETS); conf/model/<family>.yaml chooses
both, and `build_model_from_config` turns that YAML group into a model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from components.models.altclip import AltCLIP
from components.models.base import CONFIG_NAME, SIGLIP_LOGIT_SCALE_INIT, ContrastiveModel
from components.models.clip import CLIP, SIDE_FILE
from components.models.clippo import CLIPPO
from components.models.filip import FILIP
from components.models.text import TextProcessor

FAMILIES: dict[str, type[ContrastiveModel]] = {"clip": CLIP, "filip": FILIP, "clippo": CLIPPO, "altclip": AltCLIP}


def family_class(family: str) -> type[ContrastiveModel]:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}: use one of {sorted(FAMILIES)}")
    return FAMILIES[family]


def build_model(family: str, preset: str = "tiny", vocab_size: int | None = None, image_size: int | None = None,
                pretrained: str | None = None, logit_bias: float | None = None, temperature_init: float | None = None,
                **overrides: Any) -> ContrastiveModel:
    """A model of `family` at `preset` (random init), or from `pretrained`.

    vocab_size: the tokenizer's (tokens families); image_size: the data's (default: the preset's).
    overrides: the family's own knobs by name (clip/filip: pad_token_id, bos_token_id, eos_token_id;
    filip: embed_dim, token_topk_fraction; clippo: text_image_size, font_size; all: image_mean, image_std),
    and tower config fields: bare (hidden_size=256 -> every tower), per tower (vision_config={...},
    text_config={...}), or projection_dim (clip, clippo).
    logit_bias: for SigLIP's sigmoid loss, a learnable bias with this initial value (-10), and the scale starts
    at SigLIP's 10 instead of CLIP's 1/0.07 (unless the weights are pretrained).
    temperature_init: the softmax temperature a random init starts at (null: CLIP's 0.07, SigLIP's 0.1); the
    scale 1/temperature stays learnable and clamped at 100, so 0.01 is the lowest.
    """
    check_temperature_init(temperature_init, pretrained)
    model = family_class(family).build(preset=preset, vocab_size=vocab_size, image_size=image_size,
                                       pretrained=pretrained, **overrides)
    if logit_bias is not None:
        if not pretrained:
            with torch.no_grad():
                model.logit_scale.fill_(SIGLIP_LOGIT_SCALE_INIT)
        model.add_logit_bias(logit_bias)
    if temperature_init is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / temperature_init))
    return model


def check_temperature_init(temperature_init: float | None, pretrained: str | None) -> None:
    if temperature_init is None:
        return
    if isinstance(temperature_init, bool) or not isinstance(temperature_init, (int, float)) \
            or not 0.01 <= temperature_init <= 1.0:
        raise ValueError(f"model.temperature_init={temperature_init!r}: use a temperature in [0.01, 1]")
    if pretrained:
        raise ValueError("model.temperature_init applies to a random init; a pretrained model keeps its own")


def build_model_from_config(cfg: Mapping[str, Any], **kwargs: Any) -> ContrastiveModel:
    """A model from a conf/model/<family>.yaml group (a dict or DictConfig).

    kwargs: what the run knows besides the YAML, e.g. vocab_size and the special token ids from the
    tokenizer, image_size from the data. Data-side knobs (clippo's text_pair_fraction) are skipped.
    """
    if not isinstance(cfg, dict):  # an omegaconf DictConfig
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    family = cfg.pop("family")
    cls = family_class(family)
    preset = cfg.pop("preset", "tiny")
    pretrained = cfg.pop("pretrained", None)
    overrides = dict(cfg.pop("overrides", None) or {})
    knobs = {k: v for k, v in cfg.items() if k not in cls.data_knobs}
    return build_model(family, preset, pretrained=pretrained, **{**knobs, **overrides, **kwargs})


def saved_family(directory: str | Path) -> str:
    """The family of a saved model directory: clipforge.json, else config.json's "family", else a
    transformers CLIP / AltCLIP directory is family clip / altclip."""
    directory = Path(directory)
    side = directory / SIDE_FILE
    if side.is_file():
        return json.loads(side.read_text())["family"]
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a saved model directory")
    config = json.loads(config_path.read_text())
    if "family" in config:
        return config["family"]
    if config.get("model_type") in ("clip", "altclip"):  # transformers' own formats
        return config["model_type"]
    raise ValueError(f"{directory}: neither a clipforge model nor a transformers CLIP model "
                     f"(model_type {config.get('model_type')!r})")


def load_model(directory: str | Path) -> ContrastiveModel:
    """The model saved in `directory` (by save_pretrained, or any transformers CLIP directory), in eval mode."""
    return family_class(saved_family(directory)).from_pretrained(directory)


def load_model_and_text(directory: str | Path) -> tuple[ContrastiveModel, TextProcessor]:
    """The model saved in `directory`, in eval mode, and its text processor, loaded now (the directory may be a
    scratch copy that is gone when the processor is used)."""
    model = load_model(directory)
    return model, model.text_processor(directory).loaded()
