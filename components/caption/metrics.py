"""Caption metrics and the nearest-neighbour baseline.

BLEU-1..4 and CIDEr-D come from pycocoevalcap (the COCO caption evaluation code). Its PTB tokenizer needs Java,
so captions are normalised here instead: lower-cased, punctuation removed (letters and digits of every script
kept), whitespace collapsed. METEOR and SPICE also need Java and are not computed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)


def normalise(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


BLEU_ORDER = 4
BOOTSTRAP_RESAMPLES = 1000
# Differences below this are ties: scores are printed to 3 decimals, and a BLEU-4 without a single matching 4-gram
# is pycocoevalcap's smoothing residue (~1e-6), which would otherwise decide "ahead" by caption lengths.
TIE = 5e-4


@dataclass(frozen=True)
class CaptionStatistics:
    """What the corpus scores are sums and means of, one row per key, so that any subset of the keys (a bootstrap
    resample) scores without running the scorers again.

    bleu: [keys, 2 + 2 * BLEU_ORDER]: hypothesis length, closest reference length, then the hypothesis' n-gram
    counts for n = 1..4 and how many of them the references match (clipped), as pycocoevalcap's BleuScorer keeps.
    cider: [keys]: each key's CIDEr-D (document frequencies from the references of every key, as COCO scores)."""

    bleu: np.ndarray
    cider: np.ndarray


def caption_statistics(references: dict[str, list[str]], hypotheses: dict[str, str]) -> CaptionStatistics:
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test
    from pycocoevalcap.cider.cider import Cider

    if set(references) != set(hypotheses):
        raise ValueError("references and hypotheses must have the same keys")
    if not references:
        raise ValueError("no captions to score")
    gts = {k: [normalise(r) or "<empty>" for r in refs] for k, refs in references.items()}
    res = {k: [normalise(hypotheses[k]) or "<empty>"] for k in gts}
    # Per key, what BleuScorer sums: its reference length is the one closest to the hypothesis (option "closest").
    cooked = [cook_test(res[key][0], cook_refs(gts[key], n=BLEU_ORDER), eff="closest", n=BLEU_ORDER) for key in gts]
    bleu = np.array([[c["testlen"], c["reflen"], *c["guess"], *c["correct"]] for c in cooked], dtype=np.float64)
    _, cider = Cider().compute_score(gts, res)
    return CaptionStatistics(bleu=bleu, cider=np.asarray(cider, dtype=np.float64))


def _corpus_bleu(totals: np.ndarray) -> np.ndarray:
    """BLEU-1..4 from summed statistics [..., 2 + 2n], exactly as pycocoevalcap's BleuScorer.compute_score."""
    small, tiny = 1e-9, 1e-15
    testlen, reflen = totals[..., 0], totals[..., 1]
    guess, correct = totals[..., 2:2 + BLEU_ORDER], totals[..., 2 + BLEU_ORDER:]
    precision_products = np.cumprod((correct + tiny) / (guess + small), axis=-1)
    bleus = precision_products ** (1.0 / np.arange(1, BLEU_ORDER + 1))
    ratio = (testlen + tiny) / (reflen + small)
    brevity = np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)
    return bleus * brevity[..., None]


def scores_of(statistics: CaptionStatistics) -> dict[str, float]:
    bleus = _corpus_bleu(statistics.bleu.sum(axis=0))
    return {**{f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleus)}, "CIDEr": float(statistics.cider.mean())}


def caption_scores(references: dict[str, list[str]], hypotheses: dict[str, str]) -> dict[str, float]:
    """{BLEU-1..4, CIDEr} of one hypothesis per key against its references (corpus-level, as COCO reports)."""
    return scores_of(caption_statistics(references, hypotheses))


def paired_bootstrap(ours: CaptionStatistics, theirs: CaptionStatistics, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Ours minus theirs on the same keys, per metric: the difference on all keys, its 95% interval over
    `resamples` resamples of the keys (drawn with replacement, the same draw for both), and the share of
    resamples where ours scores higher by more than TIE. An interval that straddles 0 says the two are not told
    apart."""
    keys = len(ours.cider)
    if len(theirs.cider) != keys:
        raise ValueError("both sides must be scored on the same keys")
    draws = np.random.default_rng(seed).integers(0, keys, size=(resamples, keys))
    ours_bleu, theirs_bleu = _corpus_bleu(ours.bleu[draws].sum(axis=1)), _corpus_bleu(theirs.bleu[draws].sum(axis=1))
    resampled = {f"BLEU-{n + 1}": ours_bleu[:, n] - theirs_bleu[:, n] for n in range(BLEU_ORDER)}
    resampled["CIDEr"] = ours.cider[draws].mean(axis=1) - theirs.cider[draws].mean(axis=1)
    full_ours, full_theirs = scores_of(ours), scores_of(theirs)
    return {name: {"difference": full_ours[name] - full_theirs[name], "low": float(np.percentile(values, 2.5)),
                   "high": float(np.percentile(values, 97.5)), "ahead": float(np.mean(values > TIE))}
            for name, values in resampled.items()}


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
