"""Text drawn with GNU Unifont, as big_vision's `render_unifont` op draws it: CLIPPO's text input (its captions
are images), typographic attacks and the text in evaluation plots.

Unifont covers every Unicode plane with one bitmap font (unifont.otf: the Basic Multilingual Plane;
unifont_upper.otf: the planes above it, emoji among them), so every script a caption uses is drawn.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import subprocess
from collections.abc import Sequence

import numpy as np

DEFAULT_FONT_SIZE = 16  # Unifont's native size: glyphs land on whole pixels

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
def fonts(font_size: int):
    """[(ImageFont, set of code points it has)], base font first. Cached per process (per data worker)."""
    from PIL import ImageFont

    return [(ImageFont.truetype(path, font_size), _codepoints(path)) for path in unifont_paths() if path is not None]


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

    loaded = fonts(font_size)
    font = loaded[0][0]
    for candidate, codepoints in loaded:
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
