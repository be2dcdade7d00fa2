"""Named, configurable filter units. Each unit's name is also the drop reason it records.

Units run where they are cheapest: caption units before any download, header units before decoding,
the model-score unit on decoded samples. Dedup units are global and run as their own distributed pass
(components/data/dedup.py). A disabled unit is never built, so it costs nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from components.data.download import DOWNLOAD_ERRORS
from components.data.images import Header
from components.data.local_files import LOCAL_ERRORS

# Drop reasons that are not filter names: what the download and decode steps record.
DOWNLOAD_REASONS = DOWNLOAD_ERRORS + LOCAL_ERRORS
DECODE_REASONS = ("not_an_image", "truncated_image", "decode_error")
DEDUP_REASONS = ("duplicate_exact", "duplicate_near")


class CaptionLength:
    name = "caption_length"

    def __init__(self, min_chars: int = 1, max_chars: int = 1000):
        self.min_chars, self.max_chars = min_chars, max_chars

    def keep(self, caption: str | None) -> bool:
        return caption is not None and self.min_chars <= len(caption.strip()) <= self.max_chars


class CaptionWords:
    name = "caption_words"

    def __init__(self, min_words: int = 1, max_words: int = 200):
        self.min_words, self.max_words = min_words, max_words

    def keep(self, caption: str | None) -> bool:
        return caption is not None and self.min_words <= len(caption.split()) <= self.max_words


class Language:
    """Language id with py3langid (ships its model). Always annotates; drops only when `keep` is set."""

    name = "language"

    def __init__(self, keep: list[str] | tuple[str, ...] = (), min_score: float = 0.0):
        from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

        self.identifier = LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE, norm_probs=True)
        self.keep_languages = set(keep)
        self.min_score = min_score

    def identify(self, caption: str | None) -> tuple[str | None, float]:
        if not caption:
            return None, 0.0
        language, score = self.identifier.classify(caption)
        return language, float(score)

    def keep(self, language: str | None, score: float) -> bool:
        if not self.keep_languages:
            return True
        return language in self.keep_languages and score >= self.min_score


class MaxPixels:
    """Decompression-bomb guard, decided from the header before any pixel is decoded."""

    name = "max_pixels"

    def __init__(self, max_pixels: int = 89_478_485):  # Pillow's own default bomb threshold
        self.max_pixels = max_pixels

    def keep(self, header: Header) -> bool:
        return header.width * header.height <= self.max_pixels


class MinSide:
    name = "min_side"

    def __init__(self, min_side: int = 32):
        self.min_side = min_side

    def keep(self, header: Header) -> bool:
        return min(header.width, header.height) >= self.min_side


class MaxAspectRatio:
    name = "max_aspect_ratio"

    def __init__(self, max_ratio: float = 3.0):
        self.max_ratio = max_ratio

    def keep(self, header: Header) -> bool:
        short = max(1, min(header.width, header.height))
        return max(header.width, header.height) / short <= self.max_ratio


Scorer = Callable[[list[bytes], list[str]], np.ndarray]


class ModelScore:
    """Hook for a model-score filter (e.g. CLIP score): keeps pairs whose score is >= threshold.

    `scorer` is "package.module:function", a function (images: list[bytes], captions: list[str]) -> scores.
    The score is stored in the `model_score` column either way.
    """

    name = "model_score"

    def __init__(self, scorer: str, threshold: float | None = None, **scorer_kwargs: Any):
        if not scorer or ":" not in scorer:
            raise ValueError(f"filters.model_score.scorer must be 'package.module:function', got {scorer!r}")
        module, function = scorer.split(":", 1)
        self.scorer: Scorer = getattr(importlib.import_module(module), function)
        if scorer_kwargs:
            base = self.scorer
            self.scorer = lambda images, captions: base(images, captions, **scorer_kwargs)
        self.threshold = threshold

    def score(self, images: list[bytes], captions: list[str]) -> np.ndarray:
        return np.asarray(self.scorer(images, captions), dtype=np.float32)

    def keep(self, score: float) -> bool:
        return self.threshold is None or score >= self.threshold


@dataclass
class FilterSet:
    caption: list[CaptionLength | CaptionWords] = field(default_factory=list)
    language: Language | None = None
    header: list[MaxPixels | MinSide | MaxAspectRatio] = field(default_factory=list)
    model_score: ModelScore | None = None
    exact_dedup: bool = False
    near_dedup_distance: int | None = None

    def reasons(self) -> list[str]:
        """Every drop reason this set can produce, in pipeline order (for complete, stable reports)."""
        names = [unit.name for unit in self.caption]
        names += [self.language.name] if self.language and self.language.keep_languages else []
        names += list(DOWNLOAD_REASONS) + ["not_an_image"] + [unit.name for unit in self.header]
        names += ["truncated_image", "decode_error"]
        names += [self.model_score.name] if self.model_score else []
        names += ["duplicate_exact"] if self.exact_dedup else []
        names += ["duplicate_near"] if self.near_dedup_distance is not None else []
        return names


_CAPTION_UNITS = {"caption_length": CaptionLength, "caption_words": CaptionWords}
_HEADER_UNITS = {"max_pixels": MaxPixels, "min_side": MinSide, "max_aspect_ratio": MaxAspectRatio}
_ALL_UNITS = set(_CAPTION_UNITS) | set(_HEADER_UNITS) | {"language", "model_score", "exact_dedup", "near_dedup"}


def build_filters(config: Mapping[str, Mapping[str, Any]]) -> FilterSet:
    """Build the enabled units from the `filters` config group; unknown names are an error, not ignored."""
    unknown = set(config) - _ALL_UNITS
    if unknown:
        raise ValueError(f"unknown filter(s) {sorted(unknown)}; known: {sorted(_ALL_UNITS)}")
    enabled = {name: {k: v for k, v in options.items() if k != "enabled"}
               for name, options in config.items() if options.get("enabled", False)}
    filters = FilterSet()
    for name, unit in _CAPTION_UNITS.items():
        if name in enabled:
            filters.caption.append(unit(**enabled[name]))
    for name, unit in _HEADER_UNITS.items():
        if name in enabled:
            filters.header.append(unit(**enabled[name]))
    if "language" in enabled:
        filters.language = Language(**enabled["language"])
    if "model_score" in enabled:
        filters.model_score = ModelScore(**enabled["model_score"])
    filters.exact_dedup = "exact_dedup" in enabled
    if "near_dedup" in enabled:
        filters.near_dedup_distance = int(enabled["near_dedup"].get("max_distance", 2))
    return filters
