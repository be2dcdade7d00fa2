"""Stage 1 of ingest, one input part at a time: caption filters -> download -> header filters -> resize -> hashes.

Every input row leaves this stage as exactly one staging row: `status` is "ok" or the drop reason, so the
accounting identity (kept + dropped = input) holds by construction. The staging file is written whole, then
its `.done` marker: a part with a marker is never redone on resume.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from PIL import Image
from upath import UPath

from components import storage
from components.data import images
from components.data.download import DownloadConfig, SafeDownloader
from components.data.filters import FilterSet, build_filters

OK = "ok"
RESIZE_MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no")  # img2dataset's
ENCODE_QUALITY = {"jpg": (0, 100), "webp": (0, 100), "png": (0, 9)}  # quality, or png's compression level


@dataclass(frozen=True)
class ImageSettings:
    image_size: int = 256
    resize_mode: str = "border"
    encode_format: str = "jpg"
    encode_quality: int = 95
    formats: tuple[str, ...] = images.ACCEPTED_FORMATS  # Pillow formats a file may be decoded as

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"ingest.image_size must be >= 1, got {self.image_size}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"ingest.resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.encode_format not in ENCODE_QUALITY:
            raise ValueError(f"ingest.encode_format must be one of {', '.join(ENCODE_QUALITY)}, "
                             f"got {self.encode_format!r}")
        low, high = ENCODE_QUALITY[self.encode_format]
        if not low <= self.encode_quality <= high:
            raise ValueError(f"ingest.encode_quality must be in [{low}, {high}] for {self.encode_format}, "
                             f"got {self.encode_quality}")
        Image.init()
        unknown = [name for name in self.formats if name not in Image.OPEN]
        if not self.formats or unknown:
            raise ValueError(f"ingest.image_formats must name Pillow formats ({', '.join(images.ACCEPTED_FORMATS)}, "
                             f"...), got {list(self.formats)}")


@dataclass(frozen=True)
class PartSettings:
    image: ImageSettings = ImageSettings()
    download: DownloadConfig = DownloadConfig()
    filters: dict[str, Any] = field(default_factory=dict)


def staging_done_marker(staging_file: UPath) -> UPath:
    return staging_file.with_suffix(".done")


class PartProcessor:
    """A Ray Data callable class: one instance per worker keeps the HTTP pools, resizer and language model."""

    def __init__(self, settings: PartSettings):
        self.settings = settings
        self.filters: FilterSet = build_filters(settings.filters)
        self.downloader = SafeDownloader(settings.download)
        image = settings.image
        self.resizer = images.make_resizer(image.image_size, image.resize_mode, image.encode_format, image.encode_quality)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = [process_part(UPath(i), UPath(s), self) for i, s in zip(batch["input"], batch["staging"])]
        return {name: [row[name] for row in rows] for name in rows[0]}


def process_part(input_file: UPath, staging_file: UPath, worker: PartProcessor) -> dict[str, Any]:
    """Process one part into its staging file; returns {"part", "rows", "ok", "seconds", "bytes"}."""
    started = time.perf_counter()
    table = storage.read_parquet(input_file)
    columns = table.to_pydict()
    n = table.num_rows
    status: list[str] = [OK] * n
    detail: list[str | None] = [None] * n
    out: dict[str, list] = {name: [None] * n for name in (
        "image", "width", "height", "original_width", "original_height", "sha256", "phash", "language", "language_score")}
    filters = worker.filters
    captions = columns["caption"]

    for i, caption in enumerate(captions):
        for unit in filters.caption:
            if not unit.keep(caption):
                status[i] = unit.name
                break
        if filters.language is not None:
            language, score = filters.language.identify(caption)
            out["language"][i], out["language_score"][i] = language, score
            if status[i] == OK and not filters.language.keep(language, score):
                status[i] = filters.language.name

    local_images = columns.pop("image", None)
    bodies: list[bytes | None] = [None] * n
    to_fetch = [i for i in range(n) if status[i] == OK and (local_images is None or local_images[i] is None)]
    for i, result in zip(to_fetch, worker.downloader.fetch_many([columns["url"][i] for i in to_fetch])):
        if result.error:
            status[i], detail[i] = result.error, result.detail
        else:
            bodies[i] = result.body
    if local_images is not None:
        for i in range(n):
            if status[i] == OK and local_images[i] is not None:
                bodies[i] = local_images[i]

    for i in range(n):
        if status[i] == OK:
            status[i], detail[i] = _check_and_resize(bodies[i], worker, out, i)
    bodies = None  # originals are no longer needed; free them before scoring

    if filters.model_score is not None:
        _apply_model_score(filters, status, out, captions)

    staging = pa.table({**columns, "status": status, "error_message": detail, **_typed(out)})
    if filters.model_score is not None:
        staging = staging.append_column("model_score", pa.array(out["model_score"], pa.float32()))
    storage.write_parquet(staging, staging_file)
    staging_done_marker(staging_file).touch()
    kept_bytes = sum(len(b) for b in out["image"] if b is not None)
    return {"part": input_file.stem, "rows": n, "ok": status.count(OK),
            "seconds": time.perf_counter() - started, "bytes": kept_bytes}


def _check_and_resize(body: bytes, worker: PartProcessor, out: dict[str, list], i: int) -> tuple[str, str | None]:
    """Row i's (status, detail), its image fields filled in `out` when kept. Any exception while reading, decoding,
    resizing or hashing this one file drops the row as decode_error (its type in the detail): a crawl holds files
    that make decoders fail in ways no list of exception types foresees, and one must never fail the part."""
    try:
        return _checked_and_resized(body, worker, out, i)
    except Exception as error:
        return "decode_error", f"{type(error).__name__}: {error}"[:500]


def _checked_and_resized(body: bytes, worker: PartProcessor, out: dict[str, list], i: int) -> tuple[str, str | None]:
    formats = worker.settings.image.formats
    header = images.read_header(body, formats)
    if header is None:
        return "not_an_image", f"{len(body)} bytes in none of the accepted formats ({', '.join(formats)})"
    for unit in worker.filters.header:
        if not unit.keep(header):
            return unit.name, f"{header.width}x{header.height}"
    if images.is_truncated(body, header):
        return "truncated_image", f"{header.format} of {len(body)} bytes ends early"
    encoded, width, height, original_width, original_height, error = worker.resizer(io.BytesIO(body))
    if error is not None or encoded is None:
        return "decode_error", str(error)
    phash = images.perceptual_hash(encoded)  # before any field is filled: a failure leaves the row's fields empty
    out["image"][i] = encoded
    out["width"][i], out["height"][i] = width, height
    out["original_width"][i], out["original_height"][i] = original_width, original_height
    out["sha256"][i] = images.sha256_hex(body)
    out["phash"][i] = phash
    return OK, None


def _apply_model_score(filters: FilterSet, status: list[str], out: dict[str, list], captions: list) -> None:
    out["model_score"] = [None] * len(status)
    scored = [i for i, s in enumerate(status) if s == OK]
    if not scored:
        return
    scores = filters.model_score.score([out["image"][i] for i in scored], [captions[i] for i in scored])
    for i, score in zip(scored, scores):
        out["model_score"][i] = float(score)
        if not filters.model_score.keep(float(score)):
            status[i] = filters.model_score.name
            out["image"][i] = None


def _typed(out: dict[str, list]) -> dict[str, pa.Array]:
    types = {"image": pa.binary(), "width": pa.int32(), "height": pa.int32(), "original_width": pa.int32(),
             "original_height": pa.int32(), "sha256": pa.string(), "phash": pa.int64(), "language": pa.string(),
             "language_score": pa.float32()}
    return {name: pa.array(out[name], types[name]) for name in types}
