"""CLIPPO (Tschannen et al. 2022, "Image-and-Language Understanding from Pixels Only"): ONE ViT encodes both
images and captions rendered as images, so there is no tokenizer and no text tower.

text_input = "pixels": encode_text reads batch["text_pixels"], captions drawn by `render_text` (GNU Unifont,
black on white, characters wrapped to lines like big_vision's `render_unifont`) and normalised exactly like
images. Both sides share the patch embedding, the transformer, the CLS pooling (post layernorm) and one
linear projection; embeddings are L2-normalised, similarity is their dot product.

text_image_size may differ from image_size (both multiples of the patch size): the shared ViT then
interpolates its position embeddings for the other size. font_size is stored with the model so the data
pipeline and evaluators render captions the way the model was trained. text_pair_fraction (the YAML knob
for big_vision's text/text pairs) belongs to the data pipeline; the model ignores it.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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

DEFAULT_FONT_SIZE = 16  # Unifont's native size: glyphs land on whole pixels
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

# ---------------------------------------------------------------------------------------------------------
# Rendering text as images with GNU Unifont
# ---------------------------------------------------------------------------------------------------------

# Where Debian's fonts-unifont puts the fonts (unifont.otf: the Basic Multilingual Plane; unifont_upper.otf:
# the planes above it, emoji among them). Other systems: the usual font directories, then fontconfig.
_FONT_DIRS = ("/usr/share/fonts/opentype/unifont", "/usr/share/fonts", "/usr/local/share/fonts",
              "~/.local/share/fonts", "~/.fonts")
_FONT_FILES = ("unifont.otf", "unifont.ttf")
_UPPER_FILES = ("unifont_upper.otf", "unifont_upper.ttf")


def _search(names: Sequence[str]) -> str | None:
    for directory in _FONT_DIRS:
        directory = os.path.expanduser(directory)
        for name in names:
            direct = os.path.join(directory, name)
            if os.path.isfile(direct):
                return direct
            found = sorted(glob.glob(os.path.join(directory, "**", name), recursive=True))
            if found:
                return found[0]
    if shutil.which("fc-match"):
        family = "Unifont Upper" if "upper" in names[0] else "Unifont"
        try:
            path = subprocess.run(["fc-match", "-f", "%{file}", family], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            path = ""
        if os.path.basename(path) in names:
            return path
    return None


@functools.cache
def unifont_paths() -> tuple[str, str | None]:
    """(unifont, unifont_upper or None); raises when Unifont is not installed."""
    base = _search(_FONT_FILES)
    if base is None:
        raise FileNotFoundError("GNU Unifont not found: install the Debian package fonts-unifont "
                                "(apt-get install fonts-unifont)")
    upper = os.path.join(os.path.dirname(base), _UPPER_FILES[0])
    return base, upper if os.path.isfile(upper) else _search(_UPPER_FILES)


@functools.cache
def _fonts(font_size: int):
    """[(ImageFont, set of code points it has)], base font first. Cached per process (per data worker)."""
    from PIL import ImageFont

    fonts = []
    for path in unifont_paths():
        if path is not None:
            fonts.append((ImageFont.truetype(path, font_size), _codepoints(path)))
    return fonts


def _codepoints(path: str) -> frozenset[int] | None:
    try:
        from fontTools.ttLib import TTFont
    except ImportError:  # fontTools comes with matplotlib; without it every character uses the base font
        return None
    with TTFont(path, lazy=True) as font:
        return frozenset(font.getBestCmap())


@functools.lru_cache(maxsize=65536)
def _glyph(char: str, font_size: int, spacing: int, min_width: int) -> np.ndarray:
    """Ink of one character, uint8 [font_size, w] (255 = ink), trimmed horizontally as big_vision does:
    1 column of `spacing` before the ink, at least `min_width` columns (spaces stay visible as gaps)."""
    from PIL import Image, ImageDraw

    fonts = _fonts(font_size)
    font = fonts[0][0]
    for candidate, codepoints in fonts:
        if codepoints is None or ord(char) in codepoints:
            font = candidate
            break
    # Room on both sides: combining marks and wide glyphs may draw left of the origin or past the advance.
    canvas = Image.new("L", (3 * font_size, font_size), 0)
    ImageDraw.Draw(canvas).text((font_size, 0), char, font=font, fill=255)
    ink = np.asarray(canvas)
    columns = np.flatnonzero(ink.max(axis=0))
    if columns.size == 0:
        return np.zeros((font_size, min_width), np.uint8)
    start = max(columns[0] - spacing, 0)
    end = max(columns[-1] + spacing, start + min_width)
    return np.ascontiguousarray(ink[:, start:end])


def render_text(texts: Sequence[str], image_size: int, font_size: int = DEFAULT_FONT_SIZE, *,
                lower: bool = True, max_chars: int = 768) -> np.ndarray:
    """Captions as images, the way big_vision's CLIPPO `render_unifont` draws them: uint8 [B, H, W, 3].

    Each character is a Unifont glyph (code points drawn one by one, no shaping or bidi, as big_vision),
    trimmed to its ink plus 1 px spacing; characters flow left to right and wrap to a new line of
    font_size pixels when the next one does not fit; what does not fit in the square is cut. Black text on a
    white background (big_vision's default background is grey 127); lowercased like big_vision's default.
    Glyphs and fonts are cached per process, so this is cheap enough for a data pipeline's map_batches.
    """
    out = np.full((len(texts), image_size, image_size), 255, np.uint8)
    for row, text in enumerate(texts):
        text = (text.lower() if lower else text)[:max_chars]
        x = y = 0
        for char in text:
            if char in "\r\n\t":
                char = " "
            glyph = _glyph(char, font_size, 1, 4)
            width = min(glyph.shape[1], image_size)
            if x + width > image_size:
                x, y = 0, y + font_size
            if y + font_size > image_size:
                break
            region = out[row, y:y + font_size, x:x + width]
            np.minimum(region, 255 - glyph[:, :width], out=region)
            x += width
    return np.repeat(out[..., None], 3, axis=-1)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


class CLIPPO(ContrastiveModel):
    family = "clippo"
    text_input = "pixels"
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

    # -- captions -> model input (evaluators, pyfunc: the data pipeline does the same per batch) -------------
    def render(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """{"text_pixels": float [B, 3, H, W]}: texts rendered at text_image_size/font_size and normalised."""
        images = render_text(texts, self.text_image_size, self.font_size)
        return {"text_pixels": normalize_pixels(images, self.image_mean, self.image_std)}
