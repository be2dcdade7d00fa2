"""Image-text retrieval metrics over a relevance relation (many captions per image and many images per caption).

`relevant` pairs (image index, text index) say which texts belong to which images. An image query hits at k
when any of its texts ranks in the top k; a text query hits when any of its images does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from components.models.base import Features


def ranks_of_first_hit(similarity: np.ndarray, relevant: list[set[int]]) -> np.ndarray:
    """For each query row: 1-based rank of its best relevant column. An irrelevant column tied with it ranks
    ahead (pessimistic), so a constant model scores at chance, never above."""
    ranks = np.empty(len(relevant), dtype=np.int64)
    for query, targets in enumerate(relevant):
        scores = similarity[query]
        target_scores = scores[sorted(targets)]
        best = target_scores.max()
        irrelevant_ties = int((scores == best).sum() - (target_scores == best).sum())
        ranks[query] = int((scores > best).sum()) + irrelevant_ties + 1
    return ranks


def retrieval_metrics(similarity: np.ndarray, pairs: Iterable[tuple[int, int]], ks=(1, 5, 10)) -> dict[str, float]:
    """R@k both ways plus mean/median rank, from an [n_images, n_texts] similarity matrix."""
    n_images, n_texts = similarity.shape
    image_to_texts: list[set[int]] = [set() for _ in range(n_images)]
    text_to_images: list[set[int]] = [set() for _ in range(n_texts)]
    for image, text in pairs:
        image_to_texts[image].add(text)
        text_to_images[text].add(image)
    metrics = {}
    for name, sim, relevant in (("image_to_text", similarity, image_to_texts),
                                ("text_to_image", similarity.T, text_to_images)):
        ranks = ranks_of_first_hit(sim, relevant)
        for k in ks:
            metrics[f"{name}_R{k}"] = float((ranks <= k).mean())
        metrics[f"{name}_mean_rank"] = float(ranks.mean())
        metrics[f"{name}_median_rank"] = float(np.median(ranks))
    return metrics


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


def heldout_retrieval(model, tokenizer, images: list[bytes], captions: list[str]) -> dict[str, float]:
    """Image<->text retrieval metrics of `model` on (image, caption) pairs, with chance R@5 for reference."""
    from components.models.inference import image_features, text_features

    texts, pairs = caption_relevance(captions)
    model.eval()
    similarity = similarity_matrix(model.similarity, image_features(model, images), text_features(model, tokenizer, texts))
    metrics = retrieval_metrics(similarity, pairs)
    metrics["chance_image_to_text_R5"] = min(1.0, 5 / len(texts))
    metrics["images"], metrics["texts"] = len(images), len(texts)
    return metrics
