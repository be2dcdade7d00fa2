"""AltCLIP (Chen et al. 2022): a CLIP image tower with a multilingual XLM-R style text tower in its place.

The text tower pools the first token (<s>, XLM-R's [CLS]) through a layer norm and a linear `transformation`, then
`text_projection` maps it into the image tower's embedding space. The model is a plain
`transformers.AltCLIPModel`, so a saved directory loads with `transformers.AltCLIPModel.from_pretrained(dir)`.

Built three ways: from a hub name or directory (`pretrained`), from a trained CLIP `teacher` (its image tower,
projection and temperature copied, a random multilingual text tower beside them: stage 1 of
pipelines/distill_altclip.py), or at random (tests). `lock_image` freezes the image tower (LiT).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from components.models.base import (
    apply_overrides,
    check_image_size,
    preset_config,
)
from components.models.clip import CLIP, _read_normalisation

# XLM-R's special-token layout: <s> 0, <pad> 1, </s> 2, <unk> 3 (tokenizer.train_bpe(layout="xlmr")).
XLMR_TOKEN_IDS = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}
IMAGE_TOWER = ("model.vision_model.", "model.visual_projection.")


class AltCLIP(CLIP):
    family = "altclip"
    transformers_model = "AltCLIPModel"

    def __init__(self, model, image_mean=None, image_std=None):
        super().__init__(model, image_mean, image_std)
        text = model.config.text_config
        # RoBERTa numbers positions from pad_token_id + 1: that many rows of the table are never used.
        self.max_text_length = int(text.max_position_embeddings) - int(text.pad_token_id) - 1

    @classmethod
    def build(cls, preset: str = "tiny", vocab_size: int | None = None, image_size: int | None = None,
              pretrained: str | None = None, *, teacher: str | None = None, text_pretrained: str | None = None,
              lock_image: bool = False,
              pad_token_id: int | None = None, bos_token_id: int | None = None, eos_token_id: int | None = None,
              image_mean=None, image_std=None, **overrides) -> AltCLIP:
        """pretrained: an AltCLIP directory or hub name (the whole model). teacher: a saved CLIP directory whose
        image tower, projection_dim, temperature and normalisation the new model takes, with a randomly
        initialised text tower of `preset` (vocab_size and the special ids: the student tokenizer's).
        text_pretrained: an XLM-R / RoBERTa hub name or directory whose encoder becomes the text tower (its size,
        vocabulary and special ids replace the preset's).
        overrides: text tower config fields (bare, or text_config={...}); without a teacher also vision ones."""
        from transformers import AltCLIPConfig, AltCLIPModel

        if lock_image and not (pretrained or teacher):
            raise ValueError("lock_image needs trained image weights: give a teacher or a pretrained model")
        if pretrained:
            if overrides or teacher or text_pretrained:
                raise ValueError("a pretrained AltCLIP takes no teacher, text_pretrained or architecture overrides")
            model = AltCLIPModel.from_pretrained(pretrained)
            mean, std = _read_normalisation(pretrained)
            built = cls(model, image_mean or mean, image_std or std)
        else:
            p = preset_config(preset)
            text = dict(p["text"])
            if vocab_size:
                text["vocab_size"] = vocab_size
            encoder = None
            if text_pretrained:
                encoder, text, ids_of_encoder = _pretrained_encoder(text_pretrained)
                pad_token_id, bos_token_id, eos_token_id = ids_of_encoder
            towers = {"text": text}
            teacher_model = _load_teacher(teacher) if teacher else None
            if teacher_model is None:
                towers["vision"] = {**p["vision"], "image_size": image_size or p["image_size"]}
                top = {"projection_dim": p["projection_dim"]}
            else:
                top = {"projection_dim": teacher_model.model.config.projection_dim}
            apply_overrides(towers, top, overrides, text_config_class="AltCLIPTextConfig")
            if teacher_model is not None:
                if top["projection_dim"] != teacher_model.model.config.projection_dim:
                    raise ValueError("projection_dim is the teacher's embedding size; it cannot be overridden")
                towers["vision"] = teacher_model.model.config.vision_config.to_dict()
            check_image_size(towers["vision"]["image_size"], towers["vision"]["patch_size"])
            ids = {**XLMR_TOKEN_IDS, **{k: v for k, v in (("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id),
                                                         ("eos_token_id", eos_token_id)) if v is not None}}
            # max_position_embeddings in the presets is the text length in tokens (see the class docstring).
            if encoder is None:  # a preset's max_position_embeddings is the text length in tokens
                text.update(max_position_embeddings=text["max_position_embeddings"] + ids["pad_token_id"] + 1,
                            type_vocab_size=1)
            text.update(ids, project_dim=text["hidden_size"])
            config = AltCLIPConfig(text_config=text, vision_config=towers["vision"], projection_dim=top["projection_dim"])
            model = AltCLIPModel(config)
            if encoder is not None:
                renamed = {k.replace("encoder.layer.", "encoder.layers."): v for k, v in encoder.state_dict().items()}
                model.text_model.roberta.load_state_dict(renamed, strict=True)
            if teacher_model is not None:
                _copy_image_tower(teacher_model, model)
                image_mean, image_std = image_mean or teacher_model.image_mean, image_std or teacher_model.image_std
            built = cls(model, image_mean, image_std)
        if lock_image:
            built.lock_image_tower()
        return built

    def lock_image_tower(self) -> None:
        """Freeze the image tower and its projection (LiT): the optimizer never sees them."""
        for name, param in self.named_parameters():
            if name.startswith(IMAGE_TOWER):
                param.requires_grad_(False)

    # -- the interface ----------------------------------------------------------------------------------------
    def text_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, D] projected, not normalised: what stage 1 regresses onto the teacher's text features. The pooled
        token is <s>, so no eos check."""
        pooled = self.model.text_model(input_ids=batch["input_ids"],
                                       attention_mask=batch.get("attention_mask")).pooler_output
        return self.model.text_projection(pooled)

    def forward(self, pixel_values: torch.Tensor | None, batch: Mapping[str, torch.Tensor], raw_text: bool = False):
        """As ContrastiveModel.forward; raw_text=True returns only text_features(batch) (stage 1 needs no image)."""
        if raw_text:
            return self.text_features(batch)
        return super().forward(pixel_values, batch)

    def text_token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Every token through AltCLIP's pooling path (pre_LN, transformation): the <s> row is what is pooled, so
        token_embeddings' <s> row equals embed_text."""
        return self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _pretrained_encoder(name: str):
    """(XLM-R/RoBERTa encoder without pooler, its config as AltCLIP text-config fields, (pad, bos, eos) ids)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(name)
    if config.model_type not in ("xlm-roberta", "roberta"):
        raise ValueError(f"student text tower {name}: expected an XLM-R or RoBERTa model, got {config.model_type!r}")
    encoder = AutoModel.from_pretrained(name, add_pooling_layer=False)
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps")
    text = {field: getattr(config, field) for field in fields}
    return encoder, text, (config.pad_token_id, config.bos_token_id, config.eos_token_id)


def _load_teacher(directory: str) -> CLIP:
    from components.models.factory import saved_family

    family = saved_family(directory)
    if family != "clip":
        raise ValueError(f"the AltCLIP teacher must be a clip model; {directory} holds a {family!r} model")
    return CLIP.from_pretrained(directory)


def _copy_image_tower(teacher: CLIP, model) -> None:
    """The teacher's vision tower, visual projection and logit scale, bit for bit (same module layout)."""
    with torch.no_grad():
        model.vision_model.load_state_dict(teacher.model.vision_model.state_dict())
        model.visual_projection.load_state_dict(teacher.model.visual_projection.state_dict())
        model.logit_scale.copy_(teacher.model.logit_scale)


def image_tower_state(model: CLIP) -> dict[str, torch.Tensor]:
    """The image tower's weights by name, comparable between a CLIP teacher and an AltCLIP student."""
    return {name: tensor for name, tensor in model.state_dict().items() if name.startswith(IMAGE_TOWER)}

