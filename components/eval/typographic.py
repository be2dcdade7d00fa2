"""Typographic attacks (Goh et al. 2021, "Multimodal Neurons in Artificial Neural Networks"; CLIPPO's
evaluation): write a WRONG class name onto an image and see how often zero-shot classification follows the
written word instead of the picture.

`attack_image` draws the text in black GNU Unifont (the font CLIPPO renders captions with, so every script it
covers is drawn) on a white box in the lower part of the image, wrapping long text; `wrong_labels` picks the
class to write for each sample. The text-drawing helpers are shared with components/eval/plots.py.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from components.models.unifont import fonts as unifont

# A font and the code points it has (None: unknown, use it for everything), as unifont.fonts returns them
# (Unifont, then Unifont Upper for emoji and the planes above; FileNotFoundError when Unifont is missing).
FontList = Sequence[tuple[ImageFont.FreeTypeFont, "frozenset[int] | None"]]

MIN_FONT_SIZE = 16  # Unifont's native size: smaller glyphs get hard to read


def _font_for(char: str, fonts: FontList) -> ImageFont.FreeTypeFont:
    for font, codepoints in fonts:
        if codepoints is None or ord(char) in codepoints:
            return font
    return fonts[0][0]  # nobody has it: the base font's "missing glyph" box


def _runs(text: str, fonts: FontList) -> list[tuple[str, ImageFont.FreeTypeFont]]:
    """`text` cut into runs of characters that the same font draws (emoji come from Unifont Upper)."""
    runs: list[tuple[str, ImageFont.FreeTypeFont]] = []
    for char in text:
        font = _font_for(char, fonts)
        if runs and runs[-1][1] is font:
            runs[-1] = (runs[-1][0] + char, font)
        else:
            runs.append((char, font))
    return runs


def text_width(text: str, fonts: FontList) -> float:
    """Advance width of one line of `text` in pixels."""
    return sum(font.getlength(run) for run, font in _runs(text, fonts))


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fonts: FontList, fill) -> None:
    """One line of text with its top-left corner at `xy`, each character in the first font that has it."""
    x, y = xy
    for run, font in _runs(text, fonts):
        draw.text((x, y), run, font=font, fill=fill)
        x += font.getlength(run)


def wrap_text(text: str, fonts: FontList, max_width: float) -> list[str]:
    """Greedy word wrap to `max_width` pixels; a word wider than a line (or a script without spaces) is
    broken between characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if text_width(candidate, fonts) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:  # start the word on a fresh line, breaking it where it overflows
                if line and text_width(line + char, fonts) > max_width:
                    lines.append(line)
                    line = ""
                line += char
        if line:
            lines.append(line)
    return lines


def attack_image(image_bytes: bytes, text: str, size: int | None = None) -> bytes:
    """`image_bytes` with `text` written on it: black Unifont on a white box, centred at the bottom.

    size: font size in pixels (default: an eighth of the shorter side, at least 16, so the word is readable
    at the model's input resolution). Long text wraps; lines that would reach above the middle of the image
    are dropped, so the upper half stays untouched. Returns PNG bytes, RGB, the input's width and height.
    """
    with Image.open(io.BytesIO(image_bytes)) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    font_size = int(size or max(MIN_FONT_SIZE, min(width, height) // 8))
    fonts = unifont(font_size)
    margin = pad = max(1, font_size // 4)
    lines = wrap_text(text, fonts, width - 2 * (margin + pad))
    max_lines = max(1, (height // 2 - margin - 2 * pad) // font_size)
    lines = lines[:max_lines]
    if lines:
        line_widths = [text_width(line, fonts) for line in lines]
        box_width = min(width, int(np.ceil(max(line_widths))) + 2 * pad)
        box_height = len(lines) * font_size + 2 * pad
        left, bottom = (width - box_width) // 2, height - margin
        top = bottom - box_height
        draw = ImageDraw.Draw(image)
        draw.rectangle((left, top, left + box_width - 1, bottom - 1), fill="white")
        for row, (line, line_width) in enumerate(zip(lines, line_widths)):
            draw_text(draw, ((width - line_width) / 2, top + pad + row * font_size), line, fonts, fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def wrong_labels(labels: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """For each label, a class index drawn uniformly from the OTHER n_classes - 1 classes; same seed, same
    answer. int64, the shape of `labels`."""
    if n_classes < 2:
        raise ValueError(f"a wrong label needs at least 2 classes, got n_classes={n_classes}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got [{labels.min()}, {labels.max()}]")
    # A non-zero offset modulo n_classes reaches every other class exactly once: uniform and never the label.
    offsets = np.random.default_rng(seed).integers(1, n_classes, size=labels.shape)
    return (labels + offsets) % n_classes
