"""Stage 1 of ingest, one input part at a time: caption filters -> download -> header filters -> resize -> hashes.

Every input row leaves this stage as exactly one staging row: `status` is "ok" or the drop reason, so the
accounting identity (kept + dropped = input) holds by construction. The part streams through in row groups
(GROUP_ROWS below), so a worker's memory does not grow with the part; the staging file appears whole (written
aside and renamed, or uploaded in one put), then its `.done` marker: a part with a marker is never redone on resume.
"""

from __future__ import annotations

import io
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
from PIL import Image
from upath import UPath

from components import storage
from components.data import images
from components.data.download import DownloadConfig, SafeDownloader
from components.data.filters import FilterSet, build_filters
from components.data.local_files import LocalFiles

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
    local_files: bool = False  # data=image_folder: the url column names image files (data/local_files.py)


def staging_done_marker(staging_file: UPath) -> UPath:
    return staging_file.with_suffix(".done")


class PartProcessor:
    """A Ray Data callable class: one instance per worker keeps the HTTP pools, resizer and language model."""

    def __init__(self, settings: PartSettings):
        self.settings = settings
        self.filters: FilterSet = build_filters(settings.filters)
        self.downloader = (LocalFiles if settings.local_files else SafeDownloader)(settings.download)
        image = settings.image
        self.resizer = images.make_resizer(image.image_size, image.resize_mode, image.encode_format, image.encode_quality)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = [process_part(UPath(i), UPath(s), self) for i, s in zip(batch["input"], batch["staging"])]
        return {name: [row[name] for row in rows] for name in rows[0]}


# A part streams through in input order, one Parquet row group at a time: downloads run at most AHEAD_ROWS rows
# past the group being finished, each body is checked and resized as it arrives and then dropped, and a finished
# group is written out. A worker so holds a few groups of resized rows and at most 2 x thread_count bodies, whatever
# the part's size (it used to hold every body of the part at once: up to shard_size x max_bytes).
GROUP_ROWS = 256
AHEAD_ROWS = 4 * GROUP_ROWS
_IMAGE_FIELDS = ("image", "width", "height", "original_width", "original_height", "sha256", "phash")


def process_part(input_file: UPath, staging_file: UPath, worker: PartProcessor) -> dict[str, Any]:
    """Process one part into its staging file; returns {"part", "rows", "ok", "seconds", "bytes"}."""
    started = time.perf_counter()
    table = storage.read_parquet(input_file)
    n = table.num_rows
    filters = worker.filters
    captions = table.column("caption").to_pylist()
    status, detail, language, language_score = _caption_verdicts(captions, filters)
    local = table.column("image") if "image" in table.column_names else None
    columns = table.drop_columns(["image"]) if local is not None else table
    urls = table.column("url").to_pylist() if "url" in table.column_names else [None] * n
    to_fetch = deque(i for i in range(n) if status[i] == OK and (local is None or not local[i].is_valid))
    window = 2 * worker.settings.download.thread_count  # bodies downloading or downloaded and not yet resized
    in_flight: dict[Future, int] = {}
    arrived: dict[int, tuple[str, str | None, dict | None]] = {}  # row -> (status, detail, image fields)
    kept, kept_bytes = 0, 0
    with storage.atomic_write(staging_file) as file:
        writer = None
        for low in range(0, max(n, 1), GROUP_ROWS):
            high = min(n, low + GROUP_ROWS)
            while to_fetch and to_fetch[0] < high or any(i < high for i in in_flight.values()):
                while to_fetch and to_fetch[0] < low + AHEAD_ROWS and len(in_flight) < window:
                    row = to_fetch.popleft()
                    in_flight[worker.downloader.submit(urls[row])] = row
                for future in wait(in_flight, return_when=FIRST_COMPLETED).done:
                    row, result = in_flight.pop(future), future.result()
                    arrived[row] = ((result.error, result.detail, None) if result.error
                                    else _check_and_resize(result.body, worker))
            group = _group_table(columns.slice(low, high - low), range(low, high), status, detail, language,
                                 language_score, arrived, local, worker, captions)
            writer = writer or pq.ParquetWriter(file, group.schema)
            writer.write_table(group)
            kept += group.column("status").to_pylist().count(OK)
            kept_bytes += pa.compute.sum(pa.compute.binary_length(group.column("image"))).as_py() or 0
        writer.close()
    staging_done_marker(staging_file).touch()
    return {"part": input_file.stem, "rows": n, "ok": kept, "seconds": time.perf_counter() - started,
            "bytes": kept_bytes}


def _caption_verdicts(captions: list, filters: FilterSet) -> tuple[list, list, list, list]:
    """Every row's status after the caption and language filters, and its language and score."""
    n = len(captions)
    status, detail = [OK] * n, [None] * n
    language, language_score = [None] * n, [None] * n
    for i, caption in enumerate(captions):
        for unit in filters.caption:
            if not unit.keep(caption):
                status[i] = unit.name
                break
        if filters.language is not None:
            language[i], language_score[i] = filters.language.identify(caption)
            if status[i] == OK and not filters.language.keep(language[i], language_score[i]):
                status[i] = filters.language.name
    return status, detail, language, language_score


def _group_table(columns: pa.Table, rows: range, status: list, detail: list, language: list, language_score: list,
                 arrived: dict, local, worker: PartProcessor, captions: list) -> pa.Table:
    """Rows `rows` of the staging file: the input's columns, each row's verdict and its image fields. Takes the
    group's downloaded rows out of `arrived`; local images (an `image` column) are resized here."""
    group_status, group_detail = [], []
    out: dict[str, list] = {name: [] for name in _IMAGE_FIELDS}
    for i in rows:
        verdict, why, fields = arrived.pop(i, (status[i], detail[i], None))
        if verdict == OK and fields is None:  # kept by the caption filters, its bytes in the part itself
            verdict, why, fields = _check_and_resize(local[i].as_py(), worker)
        group_status.append(verdict)
        group_detail.append(why)
        for name in _IMAGE_FIELDS:
            out[name].append(fields[name] if fields else None)
    out["language"], out["language_score"] = language[rows.start:rows.stop], language_score[rows.start:rows.stop]
    model_score = None
    if worker.filters.model_score is not None:
        model_score = _apply_model_score(worker.filters, group_status, out, captions[rows.start:rows.stop])
    group = columns
    for name, values in (("status", pa.array(group_status, pa.string())),
                         ("error_message", pa.array(group_detail, pa.string())), *_typed(out).items()):
        group = group.append_column(name, values)
    if model_score is not None:
        group = group.append_column("model_score", pa.array(model_score, pa.float32()))
    return group


def _check_and_resize(body: bytes, worker: PartProcessor) -> tuple[str, str | None, dict | None]:
    """One file's (status, detail, image fields: None unless kept). Any exception while reading, decoding,
    resizing or hashing it drops the row as decode_error (its type in the detail): a crawl holds files that make
    decoders fail in ways no list of exception types foresees, and one must never fail the part."""
    try:
        return _checked_and_resized(body, worker)
    except Exception as error:
        return "decode_error", f"{type(error).__name__}: {error}"[:500], None


def _checked_and_resized(body: bytes, worker: PartProcessor) -> tuple[str, str | None, dict | None]:
    formats = worker.settings.image.formats
    header = images.read_header(body, formats)
    if header is None:
        return "not_an_image", f"{len(body)} bytes in none of the accepted formats ({', '.join(formats)})", None
    for unit in worker.filters.header:
        if not unit.keep(header):
            return unit.name, f"{header.width}x{header.height}", None
    if images.is_truncated(body, header):
        return "truncated_image", f"{header.format} of {len(body)} bytes ends early", None
    encoded, width, height, original_width, original_height, error = worker.resizer(io.BytesIO(body))
    if error is not None or encoded is None:
        return "decode_error", str(error), None
    return OK, None, {"image": encoded, "width": width, "height": height, "original_width": original_width,
                      "original_height": original_height, "sha256": images.sha256_hex(body),
                      "phash": images.perceptual_hash(encoded)}


def _apply_model_score(filters: FilterSet, status: list[str], out: dict[str, list], captions: list) -> list:
    """The group's model scores (None where a row was dropped before); drops the rows scored below the bar."""
    scores: list[float | None] = [None] * len(status)
    scored = [i for i, s in enumerate(status) if s == OK]
    if not scored:
        return scores
    for i, score in zip(scored, filters.model_score.score([out["image"][i] for i in scored],
                                                          [captions[i] for i in scored])):
        scores[i] = float(score)
        if not filters.model_score.keep(float(score)):
            status[i] = filters.model_score.name
            out["image"][i] = None
    return scores


def _typed(out: dict[str, list]) -> dict[str, pa.Array]:
    types = {"image": pa.binary(), "width": pa.int32(), "height": pa.int32(), "original_width": pa.int32(),
             "original_height": pa.int32(), "sha256": pa.string(), "phash": pa.int64(), "language": pa.string(),
             "language_score": pa.float32()}
    return {name: pa.array(out[name], types[name]) for name in types}
