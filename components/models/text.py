"""A family's text input: captions -> the arrays its `encode_text` reads, as open_clip's `get_tokenizer` gives each
model its tokenizer. Families that read tokens use `Tokens` (a tokenizer saved beside the model); CLIPPO uses
`RenderedText` (captions drawn with GNU Unifont, big_vision's `render_unifont`).

`load_model_and_text` (components/models/factory.py) returns a model with its processor, and every stage calls the
processor: the data pipeline's workers on each batch, evaluation, the CLIP-score filter, AltCLIP's teacher and the
served pyfunc. Processors are small frozen dataclasses, so a Ray task carries one by value and a worker keeps one
per setting; the model turns the arrays into its forward input (`ContrastiveModel.text_batch`).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from components.models.unifont import DEFAULT_FONT_SIZE, render_text


class TextProcessor(abc.ABC):
    @abc.abstractmethod
    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Arrays with one row per text (int64 token ids and mask, or uint8 [B, H, W, 3] renderings)."""

    def loaded(self) -> TextProcessor:
        """This processor with whatever it reads from disk read now."""
        return self

    def tensors(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(array) for name, array in self(texts).items()}


@dataclass(frozen=True)
class Tokens(TextProcessor):
    """Token ids and attention mask, padded to the model's `max_length`. The tokenizer is read from
    `tokenizer_dir` on first use, once per process (it then travels with the processor when pickled)."""
    tokenizer_dir: str
    max_length: int

    @classmethod
    def wrapping(cls, tokenizer, max_length: int) -> Tokens:
        """A processor around a tokenizer already loaded (a notebook's, a test's); its name_or_path names it."""
        text = cls(str(tokenizer.name_or_path), max_length)
        text.__dict__["tokenizer"] = tokenizer  # what the cached property holds once read
        return text

    @functools.cached_property
    def tokenizer(self):
        from components.models.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_dir)

    def loaded(self) -> Tokens:
        self.tokenizer  # noqa: B018 - cached on the instance
        return self

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        encoded = self.tokenizer([str(t) for t in texts], padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="np")
        return {"input_ids": encoded["input_ids"].astype(np.int64),
                "attention_mask": encoded["attention_mask"].astype(np.int64)}


@dataclass(frozen=True)
class RenderedText(TextProcessor):
    """Captions drawn as `image_size` square images at `font_size` (CLIPPO); the model normalises them like its
    images."""
    image_size: int
    font_size: int = DEFAULT_FONT_SIZE

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return {"text_pixels": render_text(texts, self.image_size, self.font_size)}

    def as_image(self, text: str, image_size: int) -> np.ndarray:
        """`text` drawn in place of an image (big_vision's text/text pairs): uint8 [H, W, 3]."""
        return render_text([text], image_size, self.font_size)[0]


def trimmed_tokens(batch: Mapping[str, torch.Tensor], fixed_length: bool = False) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask cut after the last column any row attends to (dynamic padding, as
    transformers' DataCollatorWithPadding pads). The processor pads every caption to the model's length once;
    most captions are a few tokens, and the masked columns only cost compute (a `tiny` CLIP step at length 32 runs
    1.31x slower: benchmarks/dynamic_padding.py). Exact for right padding: no real token attends to a padding slot.
    `fixed_length` keeps the padded length (a model whose features depend on it: FILIP)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if not fixed_length:
        used = mask.any(dim=0).nonzero()
        length = int(used[-1]) + 1 if len(used) else 1
        ids, mask = ids[:, :length], mask[:, :length]
    return {"input_ids": ids, "attention_mask": mask}


def text_ids(text: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """An int64 per row of a text batch (token ids [B, L] with their attention mask, or rendered text pixels),
    equal for equal rows: the first 8 bytes of each row's BLAKE2b digest (a collision: about 2^-64 a pair)."""
    import hashlib

    rows = text if mask is None else text * mask
    flat = rows.detach().reshape(rows.shape[0], -1).cpu().contiguous().numpy()
    digests = [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little", signed=True)
               for row in flat]
    return torch.tensor(digests, dtype=torch.int64, device=text.device)
