"""Image bytes -> checked, resized, hashed sample.

Order matters for safety and cost: the header is read first (size without decoding, so a 20000x20000 PNG
bomb is refused before a single pixel is allocated), then a cheap structural check for truncation, and only
then img2dataset's resizer decodes and re-encodes.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import imagehash
from img2dataset.resizer import Resizer
from PIL import Image

# Structural end markers: a file cut short during transfer lacks them. Decoders (cv2, PIL) often
# "succeed" on truncated data by filling grey, so this check is what catches half-downloaded images.
_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"IEND\xaeB`\x82"


# The formats a downloaded file may be decoded as (Pillow's names). Pillow otherwise tries each of its ~40 plugins
# on a file it does not recognise, and the rarely used ones fail on small crafted files with exceptions no caller
# expects (the DDS plugin's NotImplementedError, the SPIDER plugin's AttributeError); a web crawl meets such files.
# A file in no accepted format is dropped as not_an_image before any other plugin runs.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass(frozen=True)
class Header:
    format: str  # "JPEG", "PNG", "WEBP", "GIF", ...
    width: int
    height: int


def read_header(data: bytes, formats: tuple[str, ...] = ACCEPTED_FORMATS) -> Header | None:
    """Format and size from the header alone; None when the bytes are not an image in one of `formats`. Other
    exceptions of a plugin's parser propagate (the caller drops the row with the exception's type)."""
    try:
        return _header(data, formats)
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError):
        return _read_huge_header(data, formats)


def _header(data: bytes, formats: tuple[str, ...]) -> Header:
    with warnings.catch_warnings():
        # Pillow warns on huge images (and at 2x its limit raises; our max_pixels filter decides instead) and on
        # corrupt metadata (TIFF tags, EXIF): a crawl's worker log would fill with them; the row's status tells.
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data), formats=formats) as image:
            return Header(image.format or "", image.width, image.height)


def _read_huge_header(data: bytes, formats: tuple[str, ...]) -> Header | None:
    # Pillow refuses to even open images over 2x MAX_IMAGE_PIXELS; read their size with the guard lifted,
    # still without decoding, so the max_pixels filter can report them by name.
    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        return _header(data, formats)
    except (OSError, ValueError, SyntaxError):
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def is_truncated(data: bytes, header: Header) -> bool:
    """True when a JPEG/PNG/WebP/GIF file visibly ends early."""
    tail = data[-64:]
    if header.format in ("JPEG", "MPO"):
        return _JPEG_EOI not in tail
    if header.format == "PNG":
        return _PNG_IEND not in tail
    if header.format == "WEBP":
        # RIFF header: bytes 4..8 hold the size of everything after the first 8 bytes.
        return len(data) < 8 + int.from_bytes(data[4:8], "little")
    if header.format == "GIF":
        return not data.rstrip(b"\x00").endswith(b"\x3b")
    return False


def make_resizer(image_size: int, resize_mode: str, encode_format: str, encode_quality: int,
                 resize_only_if_bigger: bool = False) -> Resizer:
    """img2dataset's resizer with its conventions (alpha composited on white, cv2 area/lanczos)."""
    return Resizer(
        image_size=image_size,
        resize_mode=resize_mode,
        resize_only_if_bigger=resize_only_if_bigger,
        encode_format=encode_format,
        encode_quality=encode_quality,
    )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def perceptual_hash(encoded: bytes) -> int:
    """64-bit DCT pHash of an (already resized) image, as a signed int64 so Arrow stores it natively."""
    with Image.open(io.BytesIO(encoded)) as image:
        value = int(str(imagehash.phash(image)), 16)
    return value - (1 << 64) if value >= 1 << 63 else value
