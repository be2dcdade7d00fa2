"""Evaluation metrics as pure functions and small streaming accumulators, with memory bounded independently of
the evaluation set's size.

Ties are pessimistic everywhere: a wrong candidate whose score equals the right one's ranks ahead of it, so a
constant (or collapsed) model scores at chance or worse, never at rank 1.

- Retrieval: `retrieval_ranks_both_ways` gives each image (row) the 1-based rank of its best relevant text
  and each text (column) that of its best relevant image: 1 + #candidates scoring above it + #irrelevant
  candidates tied with it, from a callback that computes one [block, block] similarity block at a time. It holds
  one block plus O(n_rows + n_cols + relevant pairs) vectors; the full matrix never exists. Pass 1 reads the blocks holding relevant pairs (best relevant
  scores), pass 2 every block once for both directions, so the callback must return the same values each time.
  `retrieval_metrics_from_ranks` turns ranks into R@k / mean / median rank (retrieval.py's `retrieval_metrics`
  does both for a matrix already in memory).
- Classification: `ClassificationAccumulator` keeps a [C, C] confusion matrix and top-k hit counts, whatever
  the number of samples. The true class's rank is #classes scoring >= it; the top-1 prediction in a tie is the
  lowest-index tied class other than the true one, so the confusion matrix agrees with acc1.
- Linear probe: `linear_probe` fits scikit-learn logistic regression on standardised frozen features, picks C
  on held-out training data (never on the test set), optionally from k shots per class (`few_shot_indices`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

ScoreBlock = Callable[[slice, slice], np.ndarray]


def _relevant_pairs(relevant: list[set[int]], n_queries: int, n_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """(query, target) arrays of every relevant pair, sorted by query, after checking the relation."""
    if len(relevant) != n_queries:
        raise ValueError(f"relevant has {len(relevant)} entries for {n_queries} queries")
    queries, targets = [], []
    for query, query_targets in enumerate(relevant):
        if not query_targets:
            raise ValueError(f"query {query} has no relevant target: its rank is undefined")
        query_targets = np.fromiter(sorted(query_targets), dtype=np.int64, count=len(query_targets))
        if query_targets[0] < 0 or query_targets[-1] >= n_targets:
            raise ValueError(f"query {query} has a relevant target outside [0, {n_targets})")
        queries.append(np.full(len(query_targets), query, dtype=np.int64))
        targets.append(query_targets)
    if not queries:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(queries), np.concatenate(targets)


def _checked_block(score_block: ScoreBlock, queries: slice, targets: slice) -> np.ndarray:
    scores = np.asarray(score_block(queries, targets))
    expected = (queries.stop - queries.start, targets.stop - targets.start)
    if scores.shape != expected:
        raise ValueError(f"score_block({queries}, {targets}) returned shape {scores.shape}, expected {expected}")
    if np.isnan(scores).any():  # NaN compares unequal to everything and would silently rank 1
        raise ValueError(f"score_block({queries}, {targets}) returned NaN scores")
    return scores


def retrieval_ranks_blockwise(score_block: ScoreBlock, n_queries: int, n_targets: int, relevant: list[set[int]],
                              block: int = 256) -> np.ndarray:
    """1-based rank of each query's best relevant target, ties pessimistic (see the module docstring).

    score_block(query_slice, target_slice) returns the [len(queries), len(targets)] similarity block. Returns
    an int64 array of n_queries ranks.
    """
    return retrieval_ranks_both_ways(score_block, n_queries, n_targets, relevant, block)[0]


def retrieval_ranks_both_ways(score_block: ScoreBlock, n_rows: int, n_cols: int, relevant: list[set[int]],
                              block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(row ranks, column ranks): each row's rank of its best relevant column (image -> text) and each column's
    rank of its best relevant row (text -> image), from ONE pass over the blocks of the [n_rows, n_cols] matrix.

    Pass 1 takes the best relevant score of every row and column from the blocks that hold relevant pairs only
    (few, when relevant pairs lie near a diagonal as in retrieval sets); pass 2 computes every block once and
    counts, for rows and columns together, the scores at or above each best. A column that no row names has
    rank 0 (undefined). Every row needs a relevant column.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    pair_rows, pair_cols = _relevant_pairs(relevant, n_rows, n_cols)
    # Float64 holds float16/32/64 scores exactly, so equality with the block's values below is exact.
    best_row, best_col = np.full(n_rows, -np.inf), np.full(n_cols, -np.inf)
    pair_blocks = pair_rows // block * ((n_cols + block - 1) // block) + pair_cols // block
    for block_id in np.unique(pair_blocks):
        in_block = pair_blocks == block_id
        r_start, c_start = pair_rows[in_block][0] // block * block, pair_cols[in_block][0] // block * block
        scores = _checked_block(score_block, slice(r_start, min(r_start + block, n_rows)),
                                slice(c_start, min(c_start + block, n_cols)))
        values = scores[pair_rows[in_block] - r_start, pair_cols[in_block] - c_start]
        np.maximum.at(best_row, pair_rows[in_block], values)
        np.maximum.at(best_col, pair_cols[in_block], values)

    # `ahead` counts every score >= the best relevant one: the best itself and tied relevant ones included,
    # which `relevant_ties` takes back out, so only irrelevant ties rank ahead.
    ahead_row, ahead_col = np.zeros(n_rows, dtype=np.int64), np.zeros(n_cols, dtype=np.int64)
    ties_row, ties_col = np.zeros(n_rows, dtype=np.int64), np.zeros(n_cols, dtype=np.int64)
    for r_start in range(0, n_rows, block):
        rows = slice(r_start, min(r_start + block, n_rows))
        for c_start in range(0, n_cols, block):
            cols = slice(c_start, min(c_start + block, n_cols))
            scores = _checked_block(score_block, rows, cols)
            ahead_row[rows] += (scores >= best_row[rows, None]).sum(axis=1)
            ahead_col[cols] += (scores >= best_col[None, cols]).sum(axis=0)
            in_block = ((pair_rows >= rows.start) & (pair_rows < rows.stop) & (pair_cols >= cols.start)
                        & (pair_cols < cols.stop))
            r, c = pair_rows[in_block], pair_cols[in_block]
            values = scores[r - rows.start, c - cols.start]
            np.add.at(ties_row, r, (values == best_row[r]).astype(np.int64))
            np.add.at(ties_col, c, (values == best_col[c]).astype(np.int64))
    col_ranks = np.where(np.isfinite(best_col), ahead_col - ties_col + 1, 0)
    return ahead_row - ties_row + 1, col_ranks


def retrieval_metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10), *, prefix: str
                                 ) -> dict[str, float]:
    """f"{prefix}_R{k}" (fraction of ranks <= k), f"{prefix}_mean_rank" and f"{prefix}_median_rank": the keys and
    values for one direction ("image_to_text" / "text_to_image")."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no ranks: retrieval metrics of an empty query set are undefined")
    metrics = {f"{prefix}_R{k}": float((ranks <= k).mean()) for k in ks}
    metrics[f"{prefix}_mean_rank"] = float(ranks.mean())
    metrics[f"{prefix}_median_rank"] = float(np.median(ranks))
    return metrics


def _pessimistic_top1(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """argmax per row, except that a tie involving the true class goes to the lowest tied other class."""
    rows = np.arange(len(labels))
    other_maxima = scores == scores.max(axis=1, keepdims=True)
    other_maxima[rows, labels] = False
    return np.where(other_maxima.any(axis=1), other_maxima.argmax(axis=1), labels)


class ClassificationAccumulator:
    """Streaming top-k accuracy, mean per-class recall and confusion matrix over batches of class scores.

    Memory is O(C^2): the confusion matrix and one hit count per k, independent of the number of samples.
    """

    def __init__(self, n_classes: int, top_k: Sequence[int] = (1, 5)):
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        if not top_k or min(top_k) < 1:
            raise ValueError(f"top_k must be positive integers, got {top_k}")
        self.n_classes = n_classes
        self.top_k = tuple(top_k)
        self._confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
        self._hits = dict.fromkeys(self.top_k, 0)

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        scores, labels = np.asarray(scores), np.asarray(labels)
        if scores.ndim != 2 or scores.shape[1] != self.n_classes or labels.shape != (scores.shape[0],):
            raise ValueError(f"expected scores [b, {self.n_classes}] and labels [b], got {scores.shape} and "
                             f"{labels.shape}")
        if np.isnan(scores).any():
            raise ValueError("scores contain NaN")
        if labels.size and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise ValueError(f"labels outside [0, {self.n_classes})")
        labels = labels.astype(np.int64)
        true_scores = scores[np.arange(len(labels)), labels]
        # Pessimistic rank: every other class scoring >= the true class ranks ahead of it.
        ranks = (scores >= true_scores[:, None]).sum(axis=1)
        for k in self.top_k:
            self._hits[k] += int((ranks <= min(k, self.n_classes)).sum())
        np.add.at(self._confusion, (labels, _pessimistic_top1(scores, labels)), 1)

    @property
    def samples(self) -> int:
        return int(self._confusion.sum())

    def confusion_matrix(self) -> np.ndarray:
        """[C, C] int64 counts: rows are true classes, columns top-1 predictions."""
        return self._confusion.copy()

    def result(self) -> dict[str, float]:
        """acc{k} per k, mean_per_class_recall over the classes that have samples, and the sample count."""
        samples = self.samples
        if samples == 0:
            raise ValueError("no samples: call update() before result()")
        metrics = {f"acc{k}": self._hits[k] / samples for k in self.top_k}
        per_class = self._confusion.sum(axis=1)
        present = per_class > 0
        metrics["mean_per_class_recall"] = float((np.diag(self._confusion)[present] / per_class[present]).mean())
        metrics["samples"] = samples
        return metrics


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Sorted indices of `shots` random samples per class (all of a class that has fewer); same seed, same set."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    _, class_of_sample, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    by_class = np.split(np.argsort(class_of_sample, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(members)[:shots] for members in by_class]
    return np.sort(np.concatenate(chosen))


def _mean_per_class_recall(true: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean([(predicted[true == c] == c).mean() for c in np.unique(true)]))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 shots: int | None = None, seed: int = 0,
                 c_values: Sequence[float] = (0.01, 0.1, 1, 10, 100), max_iter: int = 1000) -> dict[str, float]:
    """Logistic-regression probe on standardised features; C chosen on training data only.

    Without shots, C is chosen by accuracy on a held-out 20% of the training set (stratified when every class
    has enough samples); with shots, by stratified k-fold cross-validation when every class has >= 2 samples,
    else C=1. The chosen C is refit on the whole (few-shot) training set. Test labels never seen in training
    count as errors. Returns acc1, mean_per_class_recall (over test classes), C, train_samples and classes.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    train_x, train_y = np.asarray(train_x), np.asarray(train_y)
    test_x, test_y = np.asarray(test_x), np.asarray(test_y)
    if len(test_y) == 0:
        raise ValueError("empty test set")
    if shots is not None:
        chosen = few_shot_indices(train_y, shots, seed)
        train_x, train_y = train_x[chosen], train_y[chosen]
    classes, counts = np.unique(train_y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"linear probe needs >= 2 classes in the training set, got {len(classes)}")

    def probe(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter))

    # Large C on (nearly) separable features often stops at max_iter; the held-out accuracy still judges it.
    # One BLAS thread: these matrices are small, and threads only contend (4x slower measured on 2 cores).
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        # Few-shot sets have more classes than half their samples by design: sklearn's hint does not apply.
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
        if shots is not None:
            if counts.min() >= 2:
                folds = StratifiedKFold(n_splits=min(5, int(counts.min())), shuffle=True, random_state=seed)
                accuracies = [cross_val_score(probe(c), train_x, train_y, cv=folds).mean() for c in c_values]
                best_c = c_values[int(np.argmax(accuracies))]
            else:
                best_c = 1.0
        else:
            best_c = _select_c_holdout(probe, train_x, train_y, counts, c_values, seed)
        predicted = probe(best_c).fit(train_x, train_y).predict(test_x)
    return {
        "acc1": float((predicted == test_y).mean()),
        "mean_per_class_recall": _mean_per_class_recall(test_y, predicted),
        "C": float(best_c),
        "train_samples": len(train_y),
        "classes": len(classes),
    }


def few_shot_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, shots: int,
                   draws: int, seed: int = 0, **probe_settings) -> dict[str, float]:
    """linear_probe from `shots` images per class, averaged over `draws` draws (seeds seed, seed + 1, ...): one
    draw of a few images per class moves accuracy by several points, more than a model change may (16 shots of 9
    emoji groups, one model: 0.39-0.50 over 8 draws). Adds acc1_min, acc1_max and draws; C is each draw's own."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    runs = [linear_probe(train_x, train_y, test_x, test_y, shots=shots, seed=seed + i, **probe_settings)
            for i in range(draws)]
    if draws == 1:
        return runs[0]
    accuracies = [r["acc1"] for r in runs]
    return {"acc1": float(np.mean(accuracies)),
            "mean_per_class_recall": float(np.mean([r["mean_per_class_recall"] for r in runs])),
            "acc1_min": min(accuracies), "acc1_max": max(accuracies), "draws": draws,
            "train_samples": runs[0]["train_samples"], "classes": runs[0]["classes"]}


def _select_c_holdout(probe, train_x, train_y, counts, c_values, seed) -> float:
    """The C with the best accuracy on a held-out 20% (first of equals); C=1 when no usable split exists."""
    from sklearn.model_selection import train_test_split

    n_holdout = int(np.ceil(0.2 * len(train_y)))
    # train_test_split can stratify only when each class can give both sides a sample.
    stratifiable = counts.min() >= 2 and n_holdout >= len(counts) and len(train_y) - n_holdout >= len(counts)
    fit_x, holdout_x, fit_y, holdout_y = train_test_split(train_x, train_y, test_size=0.2, random_state=seed,
                                                          stratify=train_y if stratifiable else None)
    if len(np.unique(fit_y)) < 2:
        return 1.0
    accuracies = [probe(c).fit(fit_x, fit_y).score(holdout_x, holdout_y) for c in c_values]
    return c_values[int(np.argmax(accuracies))]
