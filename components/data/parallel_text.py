"""Parallel text for AltCLIP's teacher learning: rows of (src: English, tgt: the same meaning in `lang`).

Built in: the corpus' emoji names in 14 languages (pip `emoji`) plus CLDR's spoken names (type="tts") in every
base locale installed under /usr/share/unicode/cldr (Debian unicode-cldr-core), paired by emoji with the
English caption the teacher was trained on. CLDR keywords are left out: they are word lists, not aligned
translations. Every English sentence is also paired with itself (lang "en"), as in AltCLIP.

Any TSV/CSV/Parquet with columns src, tgt, lang (and optionally split) works too. Rows come out sorted by src,
so the teacher embeds each English sentence about once per batch (see components/train/altclip.py).
"""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from upath import UPath

from components import storage

from components.data.emoji_corpus import bare_key, concept_split, load_corpus

COLUMNS = ("src", "tgt", "lang")
CLDR_DIRS = (Path("/usr/share/unicode/cldr/common/annotations"),
             Path("/usr/share/unicode/cldr/common/annotationsDerived"))


class ParallelTextError(ValueError):
    pass


def cldr_names(directories: Iterable[Path] = CLDR_DIRS, skip: Iterable[str] = ("en", "root")) -> pd.DataFrame:
    """concept, lang, tgt: CLDR's spoken emoji names of every base locale (files without a region suffix)."""
    skip = set(skip)
    rows = []
    for directory in directories:
        for path in sorted(Path(directory).glob("*.xml")):
            locale = path.stem
            if "_" in locale or locale in skip:
                continue
            for node in ET.parse(path).getroot().iter("annotation"):
                if node.get("type") == "tts" and node.text and node.text.strip() != "↑↑↑":  # ↑↑↑: "inherit"
                    rows.append((bare_key(map(ord, node.get("cp", ""))), locale, node.text.strip()))
    return pd.DataFrame(rows, columns=["concept", "lang", "tgt"])


def builtin_parallel_text(corpus_dir: str | Path, languages: Iterable[str], cldr: bool = True) -> pd.DataFrame:
    """src, tgt, lang, split, concept from the built-in corpus (one row per concept, not per art style) and CLDR.
    split is the corpus' concept split, so the held-out concepts stay held out in both AltCLIP stages."""
    corpus = load_corpus(corpus_dir).drop_duplicates("concept")
    english = corpus[["concept", "caption_en", "split"]].rename(columns={"caption_en": "src"})
    parts = [english.assign(tgt=english["src"], lang="en")]
    for lang in languages:
        column = f"caption_{lang}"
        if lang != "en" and column in corpus:
            part = corpus[["concept", column]].rename(columns={column: "tgt"}).assign(lang=lang)
            parts.append(part.merge(english, on="concept"))
    if cldr:
        parts.append(cldr_names().merge(english, on="concept"))
    pairs = pd.concat(parts, ignore_index=True).dropna(subset=["src", "tgt"])
    pairs = pairs[pairs["tgt"].str.strip() != ""].drop_duplicates(["src", "tgt", "lang"])
    return _ordered(pairs)


def read_parallel_text(path: str | os.PathLike, test_fraction: float = 0.2) -> pd.DataFrame:
    """A user's parallel text (.tsv, .csv or .parquet). Without a split column, rows are split by a hash of src,
    so every translation of one English sentence lands on the same side."""
    path = UPath(path)  # local or in an object store
    if not path.is_file():
        raise FileNotFoundError(f"parallel text {path} does not exist")
    if path.suffix == ".parquet":
        frame = storage.read_parquet(path).to_pandas()
    elif path.suffix in (".tsv", ".csv"):
        with path.open("rb") as file:
            frame = pd.read_csv(file, sep="\t" if path.suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    else:
        raise ParallelTextError(f"parallel text {path}: expected .tsv, .csv or .parquet")
    missing = [c for c in COLUMNS if c not in frame]
    if missing:
        raise ParallelTextError(f"parallel text {path} lacks column(s) {missing}; it needs {list(COLUMNS)}")
    empty = frame["src"].isna() | frame["tgt"].isna() | (frame["src"] == "") | (frame["tgt"] == "")
    if empty.any():
        raise ParallelTextError(f"parallel text {path}: {int(empty.sum())} row(s) with an empty src or tgt, "
                                f"first at row {int(empty.to_numpy().argmax())}")
    if "split" not in frame:
        frame = frame.assign(split=[concept_split(s, test_fraction) for s in frame["src"]])
    return _ordered(frame)


def _ordered(pairs: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in (*COLUMNS, "split", "concept") if c in pairs]
    return pairs[keep].sort_values(["src", "lang", "tgt"], kind="stable").reset_index(drop=True)


def fingerprint(pairs: pd.DataFrame) -> str:
    """A content hash of the pairs (the teacher-embedding cache key uses it)."""
    digest = hashlib.sha1()
    for column in ("src", "tgt", "lang", "split"):
        digest.update("\x1f".join(pairs[column].astype(str)).encode())
    return digest.hexdigest()[:16]
