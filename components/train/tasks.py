"""Training objectives as task objects: the loop calls `task.step(engine, batch)` and never knows which one runs.

A new objective (distillation, captioning) is a new class here plus an entry in TASKS; the loop is untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from components import storage
from components.models.base import ContrastiveModel, normalize_pixels
from components.models.text import trimmed_tokens
from components.train.losses import ContrastiveLoss


def engine_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32


def model_inputs(model: ContrastiveModel, batch: dict[str, torch.Tensor], dtype: torch.dtype):
    """(pixel_values, text batch) for the model's forward, from a data-pipeline batch."""
    return normalize_pixels(batch["pixels"], model.image_mean, model.image_std, dtype), model.text_batch(batch, dtype)


def _float(features: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    # The loss runs in fp32 whatever the towers' precision: softmax over a global batch needs the range.
    return tuple(f.float() if f.is_floating_point() else f for f in features)


class ContrastiveTask:
    """CLIP / FILIP / CLIPPO pretraining: symmetric InfoNCE (or SigLIP) over the global batch."""

    def __init__(self, model: ContrastiveModel, loss: ContrastiveLoss):
        self.model, self.loss = model, loss

    def step(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        image, text, logit_scale, logit_bias = self._features(engine, batch)
        loss = self.loss(_float(image), _float(text), self.model.loss_similarity, logit_scale.float(),
                         None if logit_bias is None else logit_bias.float(), self._caption_ids([batch]))
        return loss, self._metrics(logit_scale, logit_bias)

    def cached_step(self, engine, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimizer step whose contrastive batch is all of `batches` (the step's micro-batches), in the
        memory of one micro-batch: GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size
        under Memory Limited Setup"). Every micro-batch's features are computed without a graph; the loss over
        all of them gives the gradient of each feature (and of the temperature and bias); each micro-batch then
        runs forward again with its graph and back-propagates those feature gradients, which sum to the full
        batch's parameter gradient. Costs one extra forward per micro-batch. Runs engine.backward and
        engine.step once per micro-batch (DeepSpeed steps the optimizer at the last); returns the batch's loss."""
        states = []
        with torch.no_grad():
            chunks = []
            for batch in batches:
                states.append(_rng_states())
                chunks.append(self._features(engine, batch))
        image, text = _leaves([c[0] for c in chunks]), _leaves([c[1] for c in chunks])
        scale, bias = (None if v is None else v.detach().float().requires_grad_() for v in chunks[0][2:])
        loss = self.loss(image, text, self.model.loss_similarity, scale, bias, self._caption_ids(batches))
        loss.backward()
        offset = 0
        for batch, state in zip(batches, states):
            _set_rng_states(state)  # the same dropout and token choices as the pass without a graph
            chunk_image, chunk_text, chunk_scale, chunk_bias = self._features(engine, batch)
            rows = chunk_image[0].shape[0]
            surrogate = _dot(chunk_image, image, offset, rows) + _dot(chunk_text, text, offset, rows)
            if offset == 0:  # the temperature (and bias) enter the loss once: their gradient goes in once
                surrogate = surrogate + (chunk_scale.float() * scale.grad).sum()
                if chunk_bias is not None:
                    surrogate = surrogate + (chunk_bias.float() * bias.grad).sum()
            engine.backward(surrogate, scale_wrt_gas=False)  # the loss is the step's mean already
            engine.step()
            offset += rows
        return loss.detach(), self._metrics(chunks[0][2], chunks[0][3])

    def _features(self, engine, batch: dict[str, torch.Tensor]):
        """(image features, text features, logit_scale, logit_bias) of one micro-batch."""
        pixel_values, text = model_inputs(self.model, batch, engine_dtype(engine))
        # Through engine(...): under ZeRO-3 the top module's own parameters (logit_scale) are only gathered
        # inside its forward.
        image, text_features, logit_scale, logit_bias = engine(pixel_values, text)
        select_tokens = getattr(self.model, "select_tokens", None)  # FILIP: top-k% tokens, before the gather
        if select_tokens is not None:
            image, text_features = select_tokens(image, text_features)
        return image, text_features, logit_scale, logit_bias

    def _caption_ids(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
        if not self.loss.duplicate_positives:
            return None
        return torch.cat([self.model.text_identity(b) for b in batches])

    def _metrics(self, logit_scale: torch.Tensor, logit_bias: torch.Tensor | None) -> dict[str, float]:
        metrics = {"logit_scale": float(logit_scale.detach().float().exp().clamp(max=self.loss.max_logit_scale))}
        if logit_bias is not None:
            metrics["logit_bias"] = float(logit_bias.detach().float())
        return metrics


def _leaves(chunks: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Micro-batches' features joined along the batch, the floating ones as fp32 leaves whose .grad the loss fills."""
    return tuple(torch.cat([t.detach() for t in parts]).float().requires_grad_() if parts[0].is_floating_point()
                 else torch.cat(parts) for parts in zip(*chunks))


def _dot(features: tuple[torch.Tensor, ...], leaves: tuple[torch.Tensor, ...], offset: int, rows: int) -> torch.Tensor:
    """sum(features * the loss's gradient of their rows): its gradient is the loss's, through this micro-batch."""
    return sum((f.float() * leaf.grad[offset:offset + rows]).sum()
               for f, leaf in zip(features, leaves) if leaf.requires_grad)


def _rng_states() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_rng_states(states: tuple) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state_all(states[1])


class DistillTask:
    """AltCLIP stage 1, teacher learning: the student's projected text features regress onto the frozen CLIP
    teacher's (precomputed for the English side of each pair) by MSE. No images, no temperature."""

    def __init__(self, model):
        self.model = model
        model.logit_scale.requires_grad_(False)  # no contrastive term in this stage

    def step(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        student = engine(None, self.model.text_batch(batch), raw_text=True).float()
        target = batch["target"].float()
        loss = torch.nn.functional.mse_loss(student, target)
        cosine = torch.nn.functional.cosine_similarity(student.detach(), target, dim=-1).mean()
        return loss, {"cosine_to_teacher": float(cosine)}


class LanguageModelTask:
    """ClipCap's decoder pretraining: GPT-2's next-token cross-entropy on captions, padding ignored."""

    def __init__(self, model):
        self.model = model

    def step(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        text = trimmed_tokens(batch)
        labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
        loss = engine(**text, labels=labels).loss
        return loss, {"perplexity": float(loss.detach().float().exp())}


class CaptionTask:
    """ClipCap: cross-entropy of the caption tokens given the mapped CLIP prefix (components/caption/model.py)."""

    def __init__(self, model):
        self.model = model

    def step(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        # float32 in: the model casts after its (optional) whitening
        text = trimmed_tokens(batch)
        loss = engine(batch["clip_embedding"], text["input_ids"], text["attention_mask"])
        return loss, {"perplexity": float(loss.detach().float().exp())}


# Spec keys that name files a model's constructor reads: local paths or object-store locations (any node).
MODEL_FILES = ("pretrained", "teacher", "whitening")


def build_decoder_module(spec: dict[str, Any]):
    from components.caption.model import build_decoder

    with storage.local_paths(spec, MODEL_FILES) as local:
        return build_decoder(**local)


def build_captioner_module(spec: dict[str, Any]):
    from components.caption.model import ClipCap

    with storage.local_paths(spec, MODEL_FILES) as local:
        return ClipCap(**local)


def build_spec_model(spec: dict[str, Any]):
    """A contrastive model from build_model's keyword arguments, its files local or in an object store."""
    from components.models.factory import build_model

    with storage.local_paths(spec, MODEL_FILES) as local:
        return build_model(**local)


def _model(config: dict[str, Any]):
    model = build_spec_model(dict(config["model"]))
    if config.get("activation_checkpointing"):
        model.gradient_checkpointing_enable()
    return model


def build_contrastive(config: dict[str, Any]) -> ContrastiveTask:
    return ContrastiveTask(_model(config), ContrastiveLoss(**config.get("loss", {})))


def build_distill(config: dict[str, Any]) -> DistillTask:
    return DistillTask(_model(config))


def build_language_model(config: dict[str, Any]) -> LanguageModelTask:
    return LanguageModelTask(build_decoder_module(config["model"]))


def build_caption(config: dict[str, Any]) -> CaptionTask:
    return CaptionTask(build_captioner_module(config["model"]))


TASKS = {"contrastive": build_contrastive, "distill": build_distill, "lm": build_language_model,
         "caption": build_caption}


def build_task(config: dict[str, Any]):
    name = config.get("task", "contrastive")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](config)
