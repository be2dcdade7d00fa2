"""components/eval/metrics.py against brute-force references written here, on small random data with ties.

Scores are rounded to one decimal so ties between relevant and irrelevant candidates are common; the blockwise
retrieval uses blocks that are smaller than the matrix and do not divide it.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from components.eval.metrics import (
    ClassificationAccumulator,
    few_shot_indices,
    few_shot_probe,
    linear_probe,
    retrieval_metrics_from_ranks,
    retrieval_ranks_blockwise,
    retrieval_ranks_both_ways,
)
from components.eval.retrieval import retrieval_metrics
from tests.helpers import brute_force_ranks, brute_force_retrieval_metrics

N_IMAGES, N_TEXTS = 37, 53


def tied_scores(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return np.round(rng.uniform(-1, 1, size=shape), 1)


def random_relevance(rng: np.random.Generator, n_queries: int, n_targets: int, most: int = 4) -> list[set[int]]:
    return [set(rng.choice(n_targets, size=rng.integers(1, most + 1), replace=False).tolist())
            for _ in range(n_queries)]


def block_reader(similarity: np.ndarray, shapes_seen: list[tuple[int, int]] | None = None):
    def score_block(queries: slice, targets: slice) -> np.ndarray:
        block = similarity[queries, targets].copy()  # a copy, as a model would compute it
        if shapes_seen is not None:
            shapes_seen.append(block.shape)
        return block
    return score_block


@pytest.mark.parametrize("block", [8, 16, 256])
def test_blockwise_ranks_match_brute_force_with_ties(block):
    rng = np.random.default_rng(block)
    similarity = tied_scores(rng, (N_IMAGES, N_TEXTS))
    relevant = random_relevance(rng, N_IMAGES, N_TEXTS)
    shapes_seen: list[tuple[int, int]] = []

    ranks = retrieval_ranks_blockwise(block_reader(similarity, shapes_seen), N_IMAGES, N_TEXTS, relevant, block=block)

    expected = brute_force_ranks(similarity, relevant)
    assert ranks.dtype == np.int64
    np.testing.assert_array_equal(ranks, expected)
    # Ties must have been exercised, or the comparison says nothing about the tie rule.
    assert any((similarity[q] == similarity[q, sorted(t)].max()).sum() > 1 for q, t in enumerate(relevant))
    assert max(rows for rows, _ in shapes_seen) <= block and max(cols for _, cols in shapes_seen) <= block


def test_blockwise_ranks_float32_blocks():
    rng = np.random.default_rng(3)
    similarity = tied_scores(rng, (N_IMAGES, N_TEXTS)).astype(np.float32)
    relevant = random_relevance(rng, N_IMAGES, N_TEXTS)
    ranks = retrieval_ranks_blockwise(block_reader(similarity), N_IMAGES, N_TEXTS, relevant, block=16)
    np.testing.assert_array_equal(ranks, brute_force_ranks(similarity, relevant))


def test_constant_scores_rank_behind_every_irrelevant_target():
    relevant = random_relevance(np.random.default_rng(0), N_IMAGES, N_TEXTS)
    ranks = retrieval_ranks_blockwise(block_reader(np.zeros((N_IMAGES, N_TEXTS))), N_IMAGES, N_TEXTS, relevant,
                                      block=8)
    # Pessimistic: every irrelevant target ties and ranks ahead, so rank = irrelevant count + 1.
    np.testing.assert_array_equal(ranks, [N_TEXTS - len(targets) + 1 for targets in relevant])
    assert retrieval_metrics_from_ranks(ranks, prefix="image_to_text")["image_to_text_R1"] == 0.0


def test_query_without_relevant_target_is_named():
    relevant = random_relevance(np.random.default_rng(0), 6, 10)
    relevant[4] = set()
    with pytest.raises(ValueError, match="query 4 "):
        retrieval_ranks_blockwise(block_reader(np.zeros((6, 10))), 6, 10, relevant, block=4)


def test_bad_score_blocks_are_rejected():
    relevant = [{0}, {1}, {2}]
    with pytest.raises(ValueError, match="shape"):
        retrieval_ranks_blockwise(lambda q, t: np.zeros((1, 1)), 3, 3, relevant, block=2)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_ranks_blockwise(lambda q, t: np.full((q.stop - q.start, t.stop - t.start), np.nan), 3, 3,
                                  relevant, block=2)


def test_metrics_from_blockwise_ranks_equal_retrieval_metrics():
    rng = np.random.default_rng(7)
    similarity = tied_scores(rng, (N_IMAGES, N_TEXTS))
    # Every image and every text has at least one partner; some texts belong to two images.
    pairs = {(int(image), text) for text, image in enumerate(rng.permutation(np.arange(N_TEXTS) % N_IMAGES))}
    pairs |= {(int(rng.integers(N_IMAGES)), int(text)) for text in rng.choice(N_TEXTS, 15, replace=False)}
    image_to_texts = [{t for i, t in pairs if i == image} for image in range(N_IMAGES)]
    text_to_images = [{i for i, t in pairs if t == text} for text in range(N_TEXTS)]
    assert max(len(images) for images in text_to_images) > 1

    image_ranks = retrieval_ranks_blockwise(block_reader(similarity), N_IMAGES, N_TEXTS, image_to_texts, block=16)
    text_ranks = retrieval_ranks_blockwise(block_reader(similarity.T), N_TEXTS, N_IMAGES, text_to_images, block=8)
    metrics = {**retrieval_metrics_from_ranks(image_ranks, prefix="image_to_text"),
               **retrieval_metrics_from_ranks(text_ranks, prefix="text_to_image")}

    assert metrics == retrieval_metrics(similarity, sorted(pairs)) == brute_force_retrieval_metrics(similarity,
                                                                                                  sorted(pairs))

    # Both directions from one pass over the blocks, each block computed once in that pass.
    shapes_seen: list[tuple[int, int]] = []
    rows, cols = retrieval_ranks_both_ways(block_reader(similarity, shapes_seen), N_IMAGES, N_TEXTS,
                                           image_to_texts, block=8)
    assert np.array_equal(rows, brute_force_ranks(similarity, image_to_texts))
    assert np.array_equal(cols, brute_force_ranks(similarity.T, text_to_images))
    grid = -(-N_IMAGES // 8) * -(-N_TEXTS // 8)
    assert grid <= len(shapes_seen) < 2 * grid


def test_both_ways_gives_unnamed_columns_rank_zero():
    similarity = tied_scores(np.random.default_rng(3), (5, 7))
    rows, cols = retrieval_ranks_both_ways(block_reader(similarity), 5, 7, [{0}, {1}, {1}, {2}, {0, 2}], block=3)
    assert np.array_equal(rows, brute_force_ranks(similarity, [{0}, {1}, {1}, {2}, {0, 2}]))
    assert (cols[3:] == 0).all() and (cols[:3] >= 1).all()


def test_metrics_from_ranks_values():
    metrics = retrieval_metrics_from_ranks(np.array([1, 2, 6, 11]), ks=(1, 5, 10), prefix="p")
    assert metrics == {"p_R1": 0.25, "p_R5": 0.5, "p_R10": 0.75, "p_mean_rank": 5.0, "p_median_rank": 4.0}


def brute_force_classification(scores: np.ndarray, labels: np.ndarray, n_classes: int, ks: tuple[int, ...]):
    hits = dict.fromkeys(ks, 0)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    for row, label in zip(scores, labels):
        ahead = [c for c in range(n_classes) if c != label and row[c] >= row[label]]
        for k in ks:
            hits[k] += len(ahead) < k
        top = [c for c in range(n_classes) if row[c] == row.max()]
        wrong_top = [c for c in top if c != label]
        confusion[label, wrong_top[0] if wrong_top else label] += 1
    recalls = [confusion[c, c] / confusion[c].sum() for c in range(n_classes) if confusion[c].sum() > 0]
    metrics = {f"acc{k}": hits[k] / len(labels) for k in ks}
    metrics["mean_per_class_recall"] = float(np.mean(recalls))
    metrics["samples"] = len(labels)
    return metrics, confusion


@pytest.mark.parametrize("n_classes", [3, 12])
def test_classification_accumulator_matches_brute_force(n_classes):
    rng = np.random.default_rng(n_classes)
    n = 101
    scores = tied_scores(rng, (n, n_classes))
    labels = rng.integers(0, n_classes - 1, size=n)  # the last class never occurs
    # Make the true class tie with others often, so the tie rule decides many samples.
    scores[::3, :] = np.round(scores[::3, :] * 2) / 2
    accumulator = ClassificationAccumulator(n_classes, top_k=(1, 2, 5))
    for start, stop in [(0, 1), (1, 8), (8, 8), (8, 50), (50, n)]:
        accumulator.update(scores[start:stop], labels[start:stop])

    expected, expected_confusion = brute_force_classification(scores, labels, n_classes, (1, 2, 5))
    assert accumulator.result() == pytest.approx(expected)
    np.testing.assert_array_equal(accumulator.confusion_matrix(), expected_confusion)
    true_scores = scores[np.arange(n), labels]
    assert ((scores == true_scores[:, None]).sum(axis=1) > 1).sum() > 10  # ties really happen


def test_constant_class_scores_are_never_correct():
    accumulator = ClassificationAccumulator(4, top_k=(1, 5))
    labels = np.array([0, 1, 2, 3, 0])
    accumulator.update(np.zeros((5, 4)), labels)
    result = accumulator.result()
    assert result["acc1"] == 0.0 and result["mean_per_class_recall"] == 0.0
    assert result["acc5"] == 1.0  # k clipped to the 4 classes
    assert np.trace(accumulator.confusion_matrix()) == 0


def test_classification_accumulator_rejects_bad_input():
    accumulator = ClassificationAccumulator(3)
    with pytest.raises(ValueError):
        accumulator.result()
    with pytest.raises(ValueError):
        accumulator.update(np.zeros((2, 4)), np.array([0, 1]))
    with pytest.raises(ValueError):
        accumulator.update(np.zeros((2, 3)), np.array([0, 3]))


def gaussian_clusters(rng: np.random.Generator, centers: np.ndarray, per_class: int):
    labels = np.repeat(np.arange(len(centers)), per_class)
    return centers[labels] + rng.normal(size=(len(labels), centers.shape[1])), labels


def test_linear_probe_separates_clusters():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 4
    train_x, train_y = gaussian_clusters(rng, centers, 40)
    test_x, test_y = gaussian_clusters(rng, centers, 40)
    result = linear_probe(train_x, train_y, test_x, test_y)
    assert result["acc1"] > 0.9 and result["mean_per_class_recall"] > 0.9
    assert result["C"] in (0.01, 0.1, 1, 10, 100)
    assert result["train_samples"] == 160 and result["classes"] == 4


def test_linear_probe_random_labels_is_near_chance():
    rng = np.random.default_rng(1)
    train_x, test_x = rng.normal(size=(200, 8)), rng.normal(size=(400, 8))
    train_y, test_y = rng.integers(0, 4, 200), rng.integers(0, 4, 400)
    # Chance is 0.25; 0.4 is about seven standard errors above it on 400 test samples.
    assert linear_probe(train_x, train_y, test_x, test_y)["acc1"] < 0.4


def test_linear_probe_shots_uses_k_per_class():
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(5, 8)) * 4
    train_x, train_y = gaussian_clusters(rng, centers, 20)
    test_x, test_y = gaussian_clusters(rng, centers, 10)
    result = linear_probe(train_x, train_y, test_x, test_y, shots=2)
    assert result["train_samples"] == 10 and result["classes"] == 5

    # One class with a single sample: it keeps that sample, and C falls back to 1 (no 2-fold split exists).
    keep = (train_y != 4) | (np.arange(len(train_y)) == np.flatnonzero(train_y == 4)[0])
    result = linear_probe(train_x[keep], train_y[keep], test_x, test_y, shots=3)
    assert result["train_samples"] == 4 * 3 + 1 and result["C"] == 1.0


def test_few_shot_probe_averages_its_draws():
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(5, 8)) * 1.5  # overlapping clusters: one draw of 2 per class is a noisy estimate
    train_x, train_y = gaussian_clusters(rng, centers, 20)
    test_x, test_y = gaussian_clusters(rng, centers, 40)
    single = [linear_probe(train_x, train_y, test_x, test_y, shots=2, seed=s)["acc1"] for s in (7, 8, 9)]
    result = few_shot_probe(train_x, train_y, test_x, test_y, 2, draws=3, seed=7)
    assert result["acc1"] == pytest.approx(np.mean(single)) and len(set(single)) > 1
    assert (result["acc1_min"], result["acc1_max"], result["draws"]) == (min(single), max(single), 3)
    assert few_shot_probe(train_x, train_y, test_x, test_y, 2, draws=1, seed=8) == linear_probe(
        train_x, train_y, test_x, test_y, shots=2, seed=8)
    with pytest.raises(ValueError, match="draws"):
        few_shot_probe(train_x, train_y, test_x, test_y, 2, draws=0)


def test_few_shot_indices_deterministic_per_class():
    labels = np.array([2, 0, 1, 1, 0, 2, 2, 0, 1, 1, 9])
    chosen = few_shot_indices(labels, 2, seed=5)
    np.testing.assert_array_equal(chosen, few_shot_indices(labels, 2, seed=5))
    assert sorted(labels[chosen].tolist()) == [0, 0, 1, 1, 2, 2, 9]
    assert len(set(chosen.tolist())) == len(chosen)
    many = [tuple(few_shot_indices(labels, 2, seed=s)) for s in range(10)]
    assert len(set(many)) > 1  # the seed matters


def test_linear_probe_counts_unseen_test_labels_as_wrong():
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(4, 8)) * 6
    train_x, train_y = gaussian_clusters(rng, centers[:3], 30)  # class 3 never in training
    test_x, test_y = gaussian_clusters(rng, centers, 10)
    result = linear_probe(train_x, train_y, test_x, test_y)
    # The three seen classes are well separated, so exactly the 10 unseen samples are wrong.
    assert result["acc1"] == pytest.approx(30 / 40)
    assert result["mean_per_class_recall"] == pytest.approx(3 / 4)
    assert result["classes"] == 3


def test_linear_probe_needs_two_classes():
    x = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(ValueError, match="linear probe needs >= 2 classes in the training set"):
        linear_probe(x, np.zeros(10, dtype=int), x, np.zeros(10, dtype=int))


def test_linear_probe_task_draws_the_same_shots_whatever_order_the_rows_arrived_in(tmp_path):
    """The evaluation stage's probe reads its training rows in the order Ray Data delivered them; the same rows in
    another order must give the same few-shot draw, so two models' probes compare pair-wise."""
    from components.eval.store import EmbeddingStore
    from components.eval.tasks import EvalContext, linear_probe

    rng = np.random.default_rng(0)

    def noisy_clusters(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        """Three classes around one-hot centres in 8 dimensions, noisy enough that the drawn shots matter."""
        labels = np.repeat(["a", "b", "c"], per_class)
        centres = np.eye(8, dtype=np.float32)[:3]
        return centres[np.repeat(np.arange(3), per_class)] + rng.normal(size=(3 * per_class, 8)), labels

    train_x, labels = noisy_clusters(40)
    keys = [f"{i:04d}" for i in range(len(labels))]
    test_x, test_labels = noisy_clusters(20)
    test = EmbeddingStore.create(tmp_path / "test")
    test.append((test_x,), test_x, {"key": [f"t{i}" for i in range(60)], "label_cls": list(test_labels)})

    def probe(order: np.ndarray) -> list[float]:
        train = EmbeddingStore.create(tmp_path / f"train{order[0]}")
        train.append((train_x[order],), train_x[order], {"key": [keys[i] for i in order],
                                                          "label_cls": list(labels[order])})
        context = EvalContext(model=None, text=None, images=test, dataset="toy", model_name="toy",
                              embed_texts=None, embed_rows=lambda name, where: train, sample_rows=None)
        output = linear_probe(context, {"train_where": {}, "label": "cls", "shots": [2], "c_values": [1.0]})
        return [result["metrics"]["acc1"] for result in output.results]

    orders = [np.arange(120), np.random.default_rng(1).permutation(120), np.arange(120)[::-1]]
    results = [probe(order) for order in orders]
    assert results[0] == results[1] == results[2], results


@pytest.mark.parametrize("override, message", [
    ("task_settings.linear_probe.draws=0", "task_settings.linear_probe: draws=0 must be whole numbers >= 1"),
    ("task_settings.linear_probe.shots=[4,1.5]", "task_settings.linear_probe: shots[1]=1.5 must be whole numbers"),
])
def test_a_bad_probe_setting_is_refused_before_anything_starts(tmp_path, override, message):
    from tests.helpers import run_stage

    with pytest.raises(ValueError, match=re.escape(message)):
        run_stage("evaluate", f"data_path={tmp_path / 'shards'}", f"output_dir={tmp_path / 'out'}", override,
                  cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no run, no output, no scratch


def test_results_are_read_by_clip_benchmarks_own_build_into_its_table(tmp_path):
    """Our result files, one per task, through CLIP_benchmark's `build` (its released code): one row each, with
    its model_fullname and its metric names carrying our values."""
    import csv
    from types import SimpleNamespace

    from components.eval.tasks import _result, result_file
    from tests.helpers import clip_benchmark_build

    context = SimpleNamespace(dataset="coco_val", model_name="models:/clipforge-clip/3")
    results = [
        _result(context, "zeroshot_retrieval", {"image_to_text_R1": 0.2, "image_to_text_R5": 0.5,
                                                "text_to_image_R1": 0.1, "text_to_image_R5": 0.4}),
        _result(context, "zeroshot_classification", {"acc1": 0.3, "acc5": 0.6, "mean_per_class_recall": 0.25}),
        _result(context, "linear_probe", {"acc1": 0.7, "mean_per_class_recall": 0.65, "C": 1.0}),
    ]
    for result in results:
        (tmp_path / f"{result['task']}.json").write_text(json.dumps(result_file(result)))
    clip_benchmark_build([tmp_path], tmp_path / "benchmark.csv")
    with open(tmp_path / "benchmark.csv") as file:
        rows = {row["task"]: row for row in csv.DictReader(file)}
    assert set(rows) == {"zeroshot_retrieval", "zeroshot_classification", "linear_probe"}
    assert {row["model_fullname"] for row in rows.values()} == {"models:/clipforge-clip/3 models:/clipforge-clip/3"}
    retrieval = rows["zeroshot_retrieval"]
    assert float(retrieval["text_retrieval_recall@5"]) == 0.5 and float(retrieval["image_retrieval_recall@5"]) == 0.4
    assert float(retrieval["text_retrieval_recall@1"]) == 0.2 and float(retrieval["image_retrieval_recall@1"]) == 0.1
    zero_shot = rows["zeroshot_classification"]
    assert (float(zero_shot["acc1"]), float(zero_shot["acc5"]), float(zero_shot["mean_per_class_recall"])) == \
        (0.3, 0.6, 0.25)
    probe = rows["linear_probe"]
    assert float(probe["lp_acc1"]) == 0.7 and float(probe["lp_mean_per_class_recall"]) == 0.65
    assert {row["dataset"] for row in rows.values()} == {"coco_val"} and retrieval["language"] == "en"


def test_templates_by_name_are_clips_and_clip_benchmarks_and_a_datasets_own_win_over_auto():
    from components.eval.templates import resolve

    imagenet = resolve("imagenet")
    assert len(imagenet) == 80 and imagenet[0] == "a bad photo of a {}." and resolve("imagenet1k") == imagenet
    assert resolve("cifar10")[0] == "a photo of a {}." and all("{}" in t for t in resolve("cifar10"))
    assert resolve("auto") == ["{}"] and resolve("auto", ["art of {}"]) == ["art of {}"]
    assert resolve(["a {} here"], ["art of {}"]) == ["a {} here"]  # a list or a name is the user's choice
    with pytest.raises(ValueError, match="unknown template set 'imagenet21k'; use a list, auto, imagenet or one of "):
        resolve("imagenet21k")
    with pytest.raises(ValueError, match=r"every template needs a \{\} where the class name goes, got \['a photo'\]"):
        resolve(["a photo", "{}"])


def test_clip_benchmark_layout_is_read_with_its_classes_templates_and_type(tmp_path):
    from components.eval.benchmark_layout import is_benchmark_layout, read_layout

    (tmp_path / "test").mkdir()
    assert not is_benchmark_layout(tmp_path, "test")
    (tmp_path / "test" / "nshards.txt").write_text("2\n")
    (tmp_path / "test" / "0.tar").write_bytes(b"")
    (tmp_path / "classnames.txt").write_text("tench\ngoldfish\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nart of the {c}.\n")
    assert is_benchmark_layout(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="1 of the 2 shards nshards.txt counts are missing .first: 1.tar."):
        read_layout(tmp_path, "test")
    (tmp_path / "test" / "1.tar").write_bytes(b"")
    dataset = read_layout(tmp_path, "test")
    assert (dataset.kind, dataset.classes) == ("classification", ["tench", "goldfish"])
    assert dataset.templates == ["a photo of a {}.", "art of the {}."] and dataset.shards == tmp_path / "test"
    (tmp_path / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(ValueError, match="'multilabel' datasets are not supported"):
        read_layout(tmp_path, "test")


def test_cifar_pickles_that_ask_for_code_are_refused(tmp_path):
    import pickle

    from components.eval.datasets import cifar

    class Payload:  # a harmless call with a stable name (Ray replaces print in a session that started it)
        def __reduce__(self):
            return (os.getcwd, ())

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": Payload()}))
    with pytest.raises(ValueError, match="batches.meta: refused: the file asks for posix.getcwd"):
        cifar.read(tmp_path, "test")
