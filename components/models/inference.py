"""Run a trained contrastive model on raw inputs: image bytes and caption strings (through the model's text
processor, components/models/text.py) -> features / embeddings."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from components.models.base import ContrastiveModel, Features, normalize_pixels
from components.models.text import TextProcessor

BATCH = 64


def image_tensor(model: ContrastiveModel, images: list[bytes]) -> torch.Tensor:
    """Decode, resize to the model's size (no crop: evaluation), normalise -> [B, 3, H, W] float."""
    size = model.image_size
    arrays = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            arrays.append(np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)))
    return pixels_to_tensor(model, np.stack(arrays))


def pixels_to_tensor(model: ContrastiveModel, pixels: np.ndarray) -> torch.Tensor:
    return normalize_pixels(pixels, model.image_mean, model.image_std)


def text_inputs(model: ContrastiveModel, text: TextProcessor, texts: list[str]) -> dict[str, torch.Tensor]:
    """encode_text's input for `texts` (on the CPU)."""
    return model.text_batch(text.tensors(texts))


def _concat(parts: list[Features]) -> Features:
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))


@torch.no_grad()
def image_features(model: ContrastiveModel, images: list[bytes]) -> Features:
    return _concat([model.encode_image(image_tensor(model, images[i:i + BATCH])) for i in range(0, len(images), BATCH)])


@torch.no_grad()
def text_features(model: ContrastiveModel, text: TextProcessor, texts: list[str]) -> Features:
    return _concat([model.encode_text(text_inputs(model, text, texts[i:i + BATCH]))
                    for i in range(0, len(texts), BATCH)])


def _device(model: ContrastiveModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_images(model: ContrastiveModel, images: list[bytes]) -> np.ndarray:
    """L2-normalised image embeddings, computed on the model's device."""
    device = _device(model)
    return torch.cat([model.embed_image(image_tensor(model, images[i:i + BATCH]).to(device)).cpu()
                      for i in range(0, len(images), BATCH)]).float().numpy()


@torch.no_grad()
def embed_texts(model: ContrastiveModel, text: TextProcessor, texts: list[str]) -> np.ndarray:
    device = _device(model)
    return torch.cat([model.embed_text({k: v.to(device) for k, v in text_inputs(model, text,
                                                                                texts[i:i + BATCH]).items()}).cpu()
                      for i in range(0, len(texts), BATCH)]).float().numpy()
