"""Image-text retrieval metrics over a relevance relation (many captions per image and many images per caption).

`relevant` pairs (image index, text index) say which texts belong to which images. An image query hits at k
when any of its texts ranks in the top k; a text query hits when any of its images does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from components.eval.metrics import retrieval_metrics_from_ranks, retrieval_ranks_both_ways
from components.models.base import Features


def retrieval_metrics(similarity: np.ndarray, pairs: Iterable[tuple[int, int]], ks=(1, 5, 10)) -> dict[str, float]:
    """R@k both ways plus mean/median rank, from an [n_images, n_texts] similarity matrix (the evaluation stage's
    blockwise ranks, components/eval/metrics.py, over a matrix that is already in memory)."""
    n_images, n_texts = similarity.shape
    image_to_texts: list[set[int]] = [set() for _ in range(n_images)]
    for image, text in pairs:
        image_to_texts[image].add(text)
    image_ranks, text_ranks = retrieval_ranks_both_ways(lambda rows, cols: similarity[rows, cols], n_images, n_texts,
                                                        image_to_texts)
    return {**retrieval_metrics_from_ranks(image_ranks, ks, prefix="image_to_text"),
            **retrieval_metrics_from_ranks(text_ranks[text_ranks > 0], ks, prefix="text_to_image")}


@torch.no_grad()
def similarity_matrix(similarity: Callable[[Features, Features], torch.Tensor], images: Features, texts: Features,
                      block: int = 256) -> np.ndarray:
    """similarity(images, texts) computed in row blocks (FILIP's token-wise similarity is memory-hungry)."""
    rows = []
    for start in range(0, images[0].shape[0], block):
        rows.append(similarity(tuple(f[start:start + block] for f in images), texts).float().cpu().numpy())
    return np.concatenate(rows)


def caption_relevance(captions: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """Unique captions and (image, caption) relevance pairs: images that share a caption (one concept in two
    art styles, say) share its text, so the text side has no duplicate that would split the hits."""
    unique: dict[str, int] = {}
    pairs = [(image, unique.setdefault(caption, len(unique))) for image, caption in enumerate(captions)]
    return list(unique), pairs


def heldout_retrieval(model, text, images: list[bytes], captions: list[str]) -> dict[str, float]:
    """Image<->text retrieval metrics of `model` on (image, caption) pairs, with chance R@5 for reference."""
    from components.models.inference import image_features, text_features

    texts, pairs = caption_relevance(captions)
    model.eval()
    similarity = similarity_matrix(model.similarity, image_features(model, images), text_features(model, text, texts))
    metrics = retrieval_metrics(similarity, pairs)
    metrics["chance_image_to_text_R5"] = min(1.0, 5 / len(texts))
    metrics["images"], metrics["texts"] = len(images), len(texts)
    return metrics
