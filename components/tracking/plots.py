"""Figures logged to MLflow."""

from __future__ import annotations

import io
import tarfile
import textwrap

from PIL import Image, ImageDraw, ImageFont
from upath import UPath

_IMAGE_SUFFIXES = (".jpg", ".png", ".webp")


def sample_grid(pairs: list[tuple[bytes, str]], columns: int = 4, tile: int = 128) -> Image.Image:
    """Images with their captions under them, `columns` per row."""
    font = ImageFont.load_default(size=11)
    caption_height = 40
    rows = (len(pairs) + columns - 1) // columns
    grid = Image.new("RGB", (columns * tile, rows * (tile + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image_bytes, caption) in enumerate(pairs):
        x, y = (index % columns) * tile, (index // columns) * (tile + caption_height)
        with Image.open(io.BytesIO(image_bytes)) as image:
            thumb = image.convert("RGB")
            thumb.thumbnail((tile - 8, tile - 8))
            grid.paste(thumb, (x + (tile - thumb.width) // 2, y + 4))
        text = "\n".join(textwrap.wrap(caption, width=tile // 7)[:3])
        draw.multiline_text((x + 4, y + tile), text, fill="black", font=font, spacing=1)
    return grid


def shard_sample_grid(shard_dir: UPath, count: int = 16) -> Image.Image | None:
    """A grid of the first `count` samples of the first non-empty shard; None when there is none."""
    for shard in sorted(UPath(shard_dir).glob("*.tar"), key=str):
        images: dict[str, bytes] = {}
        captions: dict[str, str] = {}
        with shard.open("rb") as file, tarfile.open(fileobj=file) as tar:
            for member in tar:
                key, suffix = member.name.rsplit(".", 1)
                data = tar.extractfile(member).read()
                if f".{suffix}" in _IMAGE_SUFFIXES:
                    images[key] = data
                elif suffix == "txt":
                    captions[key] = data.decode("utf-8")
                if len(captions) >= count and len(images) >= count:
                    break
        pairs = [(images[k], captions.get(k, "")) for k in list(images)[:count]]
        if pairs:
            return sample_grid(pairs)
    return None
