"""What every contrastive model family shares: the interface the trainer, losses and evaluators use, the
tower presets (as data), config overrides, and config.json + model.safetensors persistence.

A family is one file (clip.py, filip.py, clippo.py) with one `ContrastiveModel` subclass; factory.py maps
family names to classes. Towers are transformers' CLIP modules built from `CLIPVisionConfig` /
`CLIPTextConfig`, randomly initialised unless `pretrained` names weights.

Features: what `encode_image` / `encode_text` return, a tuple of tensors that all have the batch as dim 0,
so a loss can all_gather each of them across workers and then call `similarity` on the gathered tuples.
"""

from __future__ import annotations

import abc
import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.models.text import TextProcessor, Tokens, text_ids, trimmed_tokens

Features = tuple[torch.Tensor, ...]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

# log(1 / 0.07): CLIP's initial temperature. The loss uses exp(logit_scale), clamped at 100.
LOGIT_SCALE_INIT = math.log(1 / 0.07)
# SigLIP (Zhai et al. 2023) starts at scale 10 and bias -10: the sigmoid starts near the prior that almost every
# pair in a batch is a negative.
SIGLIP_LOGIT_SCALE_INIT = math.log(10)
SIGLIP_LOGIT_BIAS_INIT = -10.0

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)  # big_vision's value_range(-1, 1)
HALF_STD = (0.5, 0.5, 0.5)



def normalize_pixels(pixels: torch.Tensor | np.ndarray, mean: Sequence[float], std: Sequence[float],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, H, W, 3] (images, or CLIPPO's rendered text) -> (x / 255 - mean) / std as [B, 3, H, W] in
    `dtype`, on the pixels' device."""
    if isinstance(pixels, np.ndarray):
        pixels = torch.from_numpy(np.ascontiguousarray(pixels))
    mean = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    images = pixels.permute(0, 3, 1, 2).float().div_(255)
    return ((images - mean) / std).to(dtype)


# Tower sizes per preset. "vision" / "text" are CLIPVisionConfig / CLIPTextConfig fields; image_size and
# vocab_size are defaults the caller normally replaces (the data's image size, the tokenizer's vocabulary).
# Text max length is max_position_embeddings. Families take what they need (CLIPPO has no text tower).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {  # trains in minutes on 2 CPU cores
        "image_size": 64,
        "projection_dim": 128,
        "vision": {"patch_size": 8, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "intermediate_size": 512},
        "text": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512,
                 "max_position_embeddings": 32, "vocab_size": 8192},
    },
    "small": {
        "image_size": 128,
        "projection_dim": 256,
        "vision": {"patch_size": 16, "hidden_size": 384, "num_hidden_layers": 8, "num_attention_heads": 6,
                   "intermediate_size": 1536},
        "text": {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 1024,
                 "max_position_embeddings": 64, "vocab_size": 16384},
    },
    "base": {  # ViT-B/16 image tower, CLIP's 512-wide 12-layer text tower
        "image_size": 224,
        "projection_dim": 512,
        "vision": {"patch_size": 16, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "intermediate_size": 3072},
        "text": {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8, "intermediate_size": 2048,
                 "max_position_embeddings": 77, "vocab_size": 49408},
    },
}


def preset_config(name: str) -> dict[str, Any]:
    """A deep copy of one preset (callers edit it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: use one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def apply_overrides(towers: dict[str, dict], top: dict[str, Any], overrides: Mapping[str, Any],
                    text_config_class: str = "CLIPTextConfig") -> None:
    """Apply `overrides` in place.

    towers: {"vision": {...}, "text": {...}} config dicts (CLIPPO passes only "vision");
    top: model-level keys a family exposes (e.g. projection_dim).
    Override keys: a `top` key; `vision_config` / `text_config` (a dict for one tower); or a bare config field
    (e.g. hidden_size, num_hidden_layers, hidden_act), applied to every tower whose config has that field.
    text_config_class: the transformers config the text tower's fields are checked against (AltCLIP: XLM-R's).
    """
    import transformers

    classes = {"vision": "CLIPVisionConfig", "text": text_config_class}
    known = {tower: set(getattr(transformers, name)().to_dict()) for tower, name in classes.items()}
    for key, value in dict(overrides or {}).items():
        if key in top:
            top[key] = value
        elif key in ("vision_config", "text_config"):
            tower = key.removesuffix("_config")
            if tower not in towers:
                raise ValueError(f"override {key!r}: this model has no {tower} tower")
            unknown = set(value) - known[tower]
            if unknown:
                raise ValueError(f"override {key}: unknown {classes[tower]} fields {sorted(unknown)}")
            towers[tower].update(value)
        else:
            targets = [t for t in towers if key in known[t]]
            if not targets:
                raise ValueError(
                    f"unknown model override {key!r}: use a field of the towers' configs (e.g. hidden_size), "
                    f"vision_config/text_config: {{...}}, or one of {sorted(top)}"
                )
            for tower in targets:
                towers[tower][key] = value


def check_image_size(image_size: int, patch_size: int) -> None:
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")


def token_ids(vocab_size: int, pad_token_id: int | None, bos_token_id: int | None,
              eos_token_id: int | None) -> dict[str, int]:
    """The special token ids a text tower needs, with defaults.

    Pass the tokenizer's ids. Defaults follow OpenAI CLIP's layout: pad = 0, bos = vocab_size - 2,
    eos = vocab_size - 1. The text tower pools the hidden state of the first eos token of each row, so every
    row must contain eos_token_id. eos_token_id == 2 is refused: transformers treats it as a pre-2023 OpenAI
    config and pools at argmax(input_ids) instead, which is wrong for any other vocabulary.
    """
    ids = {
        "pad_token_id": 0 if pad_token_id is None else int(pad_token_id),
        "bos_token_id": vocab_size - 2 if bos_token_id is None else int(bos_token_id),
        "eos_token_id": vocab_size - 1 if eos_token_id is None else int(eos_token_id),
    }
    if ids["eos_token_id"] == 2:
        raise ValueError("eos_token_id 2 selects transformers' legacy argmax pooling in CLIPTextModel: "
                         "give the tokenizer's end token another id")
    for name, value in ids.items():
        if not 0 <= value < vocab_size:
            raise ValueError(f"{name} {value} is outside the vocabulary (vocab_size {vocab_size})")
    return ids


def check_has_eos(input_ids: torch.Tensor, eos_token_id: int) -> None:
    """Fail loudly (instead of pooling position 0) when some row has no eos token: a tokenizer/model mismatch."""
    if torch.compiler.is_compiling():
        return
    if not bool((input_ids == eos_token_id).any(dim=-1).all()):
        raise ValueError(f"every text row must contain eos_token_id {eos_token_id} (the pooled position): "
                         "was the model built with this tokenizer's special token ids?")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


class ContrastiveModel(nn.Module, metaclass=abc.ABCMeta):
    """Two encoders into one embedding space, and a similarity between their features.

    Subclasses set the class attribute `family`, a `logit_scale` parameter (log of the inverse temperature,
    initialised to log(1/0.07); the loss applies exp() and clamps it at 100), and the attributes image_size /
    image_mean / image_std (what the data pipeline resizes and normalises with) and, for tokens models,
    max_text_length.

    Text input: a family owns it. `text_processor` gives the processor that turns captions into arrays (every stage
    calls it), `text_batch` turns those arrays into what encode_text reads. The defaults are a tokens family's:
    token ids and mask from the tokenizer saved beside the model (`uses_tokenizer`), dynamically padded. CLIPPO
    overrides all three (Unifont renderings, no tokenizer).
    fixed_text_length: a tokens model whose features depend on the padded length L, not only on the real
                tokens; its batches keep max_text_length instead of cutting trailing padding.
    """

    family: ClassVar[str]
    uses_tokenizer: ClassVar[bool] = True
    fixed_text_length: ClassVar[bool] = False
    default_image_mean: ClassVar[tuple[float, ...]] = OPENAI_CLIP_MEAN
    default_image_std: ClassVar[tuple[float, ...]] = OPENAI_CLIP_STD
    # Knobs in conf/model/<family>.yaml that belong to the data pipeline, not to the model.
    data_knobs: ClassVar[tuple[str, ...]] = ()

    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    logit_scale: nn.Parameter

    # -- text input --------------------------------------------------------------------------------------------
    def text_processor(self, tokenizer) -> TextProcessor:
        """Captions -> this model's text arrays. tokenizer: the directory of its tokenizer (the export, a run's),
        or a tokenizer already loaded."""
        if tokenizer is None:
            raise ValueError(f"a {self.family} model reads tokens: give its tokenizer or the directory of it")
        if isinstance(tokenizer, (str, os.PathLike)):
            return Tokens(str(tokenizer), self.max_text_length)
        return Tokens.wrapping(tokenizer, self.max_text_length)

    def text_batch(self, arrays: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
                   ) -> dict[str, torch.Tensor]:
        """The processor's arrays (as tensors, on the model's device) -> encode_text's input."""
        return trimmed_tokens(arrays, self.fixed_text_length)

    def text_identity(self, arrays: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """An int64 per row of the processor's arrays, equal exactly for equal texts (duplicate captions)."""
        return text_ids(arrays["input_ids"], arrays["attention_mask"])

    # -- the interface -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_image(self, pixel_values: torch.Tensor) -> Features:
        """The image features (a tuple; the global embedding first for dual encoders)."""

    @abc.abstractmethod
    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> Features:
        """The text features (token ids and mask, or CLIPPO's rendered text)."""

    @abc.abstractmethod
    def similarity(self, image: Features, text: Features) -> torch.Tensor:
        """[n_images, n_texts] similarities in [-1, 1], not yet multiplied by exp(logit_scale)."""

    def loss_similarity(self, image: Features, text: Features) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """What the contrastive loss scores pairs with: one matrix for both directions, or an (image-to-text,
        text-to-image) pair of [n_images, n_texts] matrices where the family's paper uses two (FILIP)."""
        return self.similarity(image, text)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, D] L2-normalised global image embedding (linear probe, pyfunc)."""
        return self.image_embedding(self.encode_image(pixel_values))

    def embed_text(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, D] L2-normalised global text embedding."""
        return self.text_embedding(self.encode_text(batch))

    def image_embedding(self, image: Features) -> torch.Tensor:
        """The global embedding inside already computed image features (dual encoders: the features)."""
        return image[0]

    def text_embedding(self, text: Features) -> torch.Tensor:
        return text[0]

    def class_scores(self, image: Features, class_texts: Features, templates: int) -> torch.Tensor:
        """[n_images, n_classes] zero-shot scores. class_texts: features of n_classes * templates prompts,
        class-major. Dual encoders average each class's normalised template embeddings and renormalise
        (CLIP's prompt ensemble); late-interaction families override."""
        embeddings = self.text_embedding(class_texts)
        per_class = l2_normalize(embeddings.reshape(-1, templates, embeddings.shape[-1]).mean(dim=1))
        return self.similarity(image, (per_class,))

    def token_embeddings(self, pixel_values: torch.Tensor, batch: Mapping[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token embeddings in the shared space, for token/patch alignment maps:
        (patches [B, P, D], text tokens [B, L, D], mask [B, L]), each vector L2-normalised.

        Patches exclude any CLS token and are in row-major grid order; mask is 1.0 for real text tokens (bos and
        eos included) and 0.0 for padding, whose vectors are zeroed. Families without token-level outputs in
        the shared space (CLIPPO: no text tokens) raise NotImplementedError.
        """
        raise NotImplementedError(f"{self.family} does not expose token-level embeddings")

    def forward(self, pixel_values: torch.Tensor, batch: Mapping[str, torch.Tensor]
                ) -> tuple[Features, Features, torch.Tensor, torch.Tensor | None]:
        """Both encoders in one call (what DeepSpeed's engine wraps):
        (image features, text features, logit_scale, logit_bias or None).

        The scalars come out of forward because under ZeRO-3 a module's own parameters are only gathered
        inside its forward."""
        bias = self.logit_bias
        return (self.encode_image(pixel_values), self.encode_text(batch), self.logit_scale * 1,
                None if bias is None else bias * 1)

    # -- SigLIP's logit bias -----------------------------------------------------------------------------------
    @property
    def logit_bias(self) -> nn.Parameter | None:
        """The learnable bias of the sigmoid loss, or None (InfoNCE needs none: softmax ignores a shift)."""
        return self._parameters.get("logit_bias")

    def add_logit_bias(self, init: float = SIGLIP_LOGIT_BIAS_INIT) -> None:
        # Straight into _parameters: register_parameter refuses a name the class already has (the property).
        self._parameters["logit_bias"] = nn.Parameter(torch.tensor(float(init)))

    # -- conveniences ----------------------------------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute tower activations in backward (big presets on small GPUs)."""
        from transformers import PreTrainedModel

        for module in self.modules():
            if isinstance(module, PreTrainedModel):
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- persistence: config.json + model.safetensors (clip overrides with the transformers format) -----------
    config: dict[str, Any]  # JSON-serialisable; `from_config(config)` rebuilds the architecture

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ContrastiveModel:
        return cls(dict(config))

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"family": self.family, "format_version": FORMAT_VERSION, **self.config,
                  "logit_bias": self.logit_bias is not None}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_model(self, str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ContrastiveModel:
        from safetensors.torch import load_model

        directory = Path(directory)
        config = read_config(directory)
        if config.get("family") != cls.family:
            raise ValueError(f"{directory} holds a {config.get('family')!r} model, not {cls.family!r}")
        model = cls.from_config(config)
        if config.get("logit_bias"):
            model.add_logit_bias()  # its value comes with the weights
        load_model(model, str(directory / WEIGHTS_NAME), strict=True)
        return model.eval()


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a saved model directory")
    return json.loads(path.read_text())


def tower_configs(config: Mapping[str, Any]):
    """(CLIPVisionConfig, CLIPTextConfig | None) from the dicts in a family config."""
    from transformers import CLIPTextConfig, CLIPVisionConfig

    vision = CLIPVisionConfig.from_dict(dict(config["vision_config"]))
    text = CLIPTextConfig.from_dict(dict(config["text_config"])) if config.get("text_config") else None
    return vision, text


def init_linear(layer: nn.Linear, std: float) -> nn.Linear:
    nn.init.normal_(layer.weight, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer
