"""Caption metrics and the nearest-neighbour baseline.

BLEU-1..4 and CIDEr-D come from pycocoevalcap (the COCO caption evaluation code). Its PTB tokenizer needs Java,
so captions are normalised here instead: lower-cased, punctuation removed (letters and digits of every script
kept), whitespace collapsed. METEOR and SPICE also need Java and are not computed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

_PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)


def normalise(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def caption_scores(references: dict[str, list[str]], hypotheses: dict[str, str]) -> dict[str, float]:
    """{BLEU-1..4, CIDEr} of one hypothesis per key against its references (corpus-level, as COCO reports)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(references) != set(hypotheses):
        raise ValueError("references and hypotheses must have the same keys")
    if not references:
        raise ValueError("no captions to score")
    gts = {k: [normalise(r) or "<empty>" for r in refs] for k, refs in references.items()}
    res = {k: [normalise(h) or "<empty>"] for k, h in hypotheses.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}, "CIDEr": float(cider)}


def exact_match(references: dict[str, list[str]], hypotheses: dict[str, str]) -> float:
    """Share of keys whose hypothesis equals one of its references after normalisation."""
    hits = [normalise(hypotheses[k]) in {normalise(r) for r in refs} for k, refs in references.items()]
    return float(np.mean(hits)) if hits else 0.0


def nearest_captions(queries: np.ndarray, candidates: Iterable[tuple[np.ndarray, list[str]]]) -> list[str]:
    """For each query embedding, the caption of the most similar candidate (cosine; embeddings L2-normalised),
    scanning candidate blocks one at a time (each block: embeddings [n, D] and their captions)."""
    best_score = np.full(len(queries), -np.inf)
    best_caption = [""] * len(queries)
    for embeddings, captions in candidates:
        scores = queries @ embeddings.T
        index = scores.argmax(axis=1)
        top = scores[np.arange(len(queries)), index]
        for row in np.flatnonzero(top > best_score):
            best_score[row], best_caption[row] = top[row], captions[index[row]]
    return best_caption


def cache_blocks(cache_dir: str | Path, split: str) -> Iterable[tuple[np.ndarray, list[str]]]:
    """(embeddings, first captions) of one split, one cached Parquet file at a time."""
    import json

    from components import storage

    for path in storage.parquet_files(cache_dir):
        frame = storage.read_parquet(path).to_pandas()
        frame = frame[frame["split"] == split]
        if len(frame):
            yield (np.stack(frame["emb"]).astype(np.float32),
                   [(json.loads(c) or [""])[0] for c in frame["captions"]])
