"""The evaluators: each a function `task(context, settings) -> TaskOutput`, registered by name in TASKS.

Evaluators see a model only through the family-independent interface (`similarity`, `class_scores`,
`image_embedding`, `token_embeddings`) and features read block by block from EmbeddingStores, so none of them
branches on the family and none holds more than a block of features.

Results follow CLIP_benchmark's shape: {"dataset", "model", "task", "metrics", "language"}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from components.eval import metrics as M
from components.eval.store import EmbeddingStore


@dataclass
class EvalContext:
    """What every evaluator may use. `embed_texts` / `embed_rows` give stores filled by Ray Data batch inference."""

    model: Any  # ContrastiveModel, on the driver, eval mode
    text: Any  # its text processor (components/models/text.py)
    images: EmbeddingStore  # the evaluated rows
    dataset: str
    model_name: str
    embed_texts: Callable[[list[str], str], EmbeddingStore]  # (texts, cache name) -> store with `text_index`
    embed_rows: Callable[[str, Any], EmbeddingStore]  # (name, where or a row transform) -> image store
    sample_rows: Callable[[int], list[dict]]  # the first n evaluated rows with their image bytes
    block: int = 256


@dataclass
class TaskOutput:
    results: list[dict] = field(default_factory=list)
    images: dict[str, Any] = field(default_factory=dict)  # artifact name -> PIL image


def _tensors(arrays: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.asarray(a)) for a in arrays)


@torch.no_grad()
def prompt_features(context: EvalContext, texts: list[str], batch: int = 256) -> tuple[torch.Tensor, ...]:
    """Features of a few texts (prompts), computed where the driver's (or trainer's) model lives; float32 on CPU."""
    from components.models.inference import text_inputs

    model, parts = context.model, []
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch):
        inputs = text_inputs(model, context.text, texts[start:start + batch])
        features = model.encode_text({k: v.to(device) for k, v in inputs.items()})
        parts.append(tuple(f.float().cpu() for f in features))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))


def _result(context: EvalContext, task: str, metrics: dict, language: str = "en") -> dict:
    """One result in CLIP_benchmark's shape: `model` and `pretrained` both name the evaluated model (its URI: our
    models have no separate architecture name)."""
    return {"dataset": context.dataset, "model": context.model_name, "pretrained": context.model_name, "task": task,
            "metrics": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
            "language": language}


def result_file(result: dict) -> dict:
    """A result as its file holds it, which `clip_benchmark build` reads as it is: the metrics CLIP_benchmark also
    computes carry its names beside ours (names with `@`, which MLflow refuses: files only)."""
    return {**result, "metrics": {**result["metrics"], **clip_benchmark_names(result["task"], result["metrics"])}}


def clip_benchmark_names(task: str, metrics: dict) -> dict:
    """CLIP_benchmark's keys for our metrics of the same definition: `text_retrieval_recall@k` is image->text R@k
    (an image's query finds one of its captions), `image_retrieval_recall@k` text->image; the probe's `lp_acc1`
    and `lp_mean_per_class_recall`. Zero-shot's acc1, acc5 and mean_per_class_recall already are its names."""
    if task in ("zeroshot_retrieval", "multilingual_retrieval"):
        return {name: metrics[ours] for k in (1, 5, 10)
                for name, ours in ((f"text_retrieval_recall@{k}", f"image_to_text_R{k}"),
                                   (f"image_retrieval_recall@{k}", f"text_to_image_R{k}")) if ours in metrics}
    if task.startswith("linear_probe"):
        return {f"lp_{name}": metrics[name] for name in ("acc1", "mean_per_class_recall") if name in metrics}
    return {}


def _labels(store: EmbeddingStore, name: str) -> list[str]:
    column = f"label_{name}"
    try:
        return [str(v) for v in store.meta_column(column)]
    except KeyError:
        raise ValueError(f"label {name!r} is not among the data's labels: add it under fields.labels") from None


# -- zero-shot classification ------------------------------------------------------------------------------------
def _class_index(labels: list[str], classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(label, -1) for label in labels])


@torch.no_grad()
def zero_shot_scores(context: EvalContext, store: EmbeddingStore, labels: np.ndarray, classes: list[str],
                     templates: list[str]) -> M.ClassificationAccumulator:
    prompts = [template.format(name) for name in classes for template in templates]
    class_features = prompt_features(context, prompts)
    accumulator = M.ClassificationAccumulator(len(classes))
    for start, stop in store.blocks(context.block):
        scores = context.model.class_scores(_tensors(store.features(start, stop)), class_features, len(templates))
        keep = labels[start:stop] >= 0
        accumulator.update(scores.float().numpy()[keep], labels[start:stop][keep])
    return accumulator


def _classes(labels: list[str]) -> list[str]:
    classes = sorted({label for label in labels if label})
    if len(classes) < 2:
        raise ValueError(f"zero-shot classification needs at least 2 classes, found {len(classes)}")
    return classes


def zeroshot_classification(context: EvalContext, settings: dict) -> TaskOutput:
    from components.eval.plots import confusion_matrix_plot

    labels = _labels(context.images, settings["label"])
    # The dataset's class list when it has one (CLIP_benchmark classifies among every class), else the labels seen.
    classes = list(settings.get("classes") or _classes(labels))
    accumulator = zero_shot_scores(context, context.images, _class_index(labels, classes), classes,
                                   list(settings["templates"]))
    metrics = {**accumulator.result(), "classes": len(classes), "templates": len(settings["templates"])}
    plot = confusion_matrix_plot(accumulator.confusion_matrix(), classes)
    return TaskOutput([_result(context, "zeroshot_classification", metrics)], {"zeroshot_confusion.png": plot})


# -- retrieval ---------------------------------------------------------------------------------------------------
def caption_lists_relevance(caption_lists: list[list[str]]) -> tuple[list[str], list[set[int]], list[set[int]]]:
    """(unique texts, texts of each image, images of each text): images sharing a caption share its text row."""
    unique: dict[str, int] = {}
    image_texts = [{unique.setdefault(c, len(unique)) for c in captions} for captions in caption_lists]
    text_images: list[set[int]] = [set() for _ in unique]
    for image, texts in enumerate(image_texts):
        for text in texts:
            text_images[text].add(image)
    return list(unique), image_texts, text_images


@torch.no_grad()
def retrieval_metrics(context: EvalContext, caption_lists: list[list[str]], cache_name: str,
                      ks=(1, 5, 10)) -> tuple[dict, EmbeddingStore, list[str], list[set[int]]]:
    """R@k both ways, mean/median rank, over rows that have captions (blockwise: bounded memory)."""
    rows = [i for i, captions in enumerate(caption_lists) if captions]
    if not rows:
        raise ValueError(f"retrieval ({cache_name}): no row has a caption")
    texts, image_texts, _ = caption_lists_relevance([caption_lists[i] for i in rows])
    text_store = context.embed_texts(texts, cache_name)
    # Store rows arrive in any order: map text index -> store row.
    position = np.empty(len(texts), dtype=np.int64)
    position[np.asarray(text_store.meta_column("text_index"))] = np.arange(len(text_store))
    images = context.images
    row_array = np.asarray(rows)

    def image_block(start: int, stop: int) -> tuple[torch.Tensor, ...]:
        selected = row_array[start:stop]
        lo, hi = int(selected.min()), int(selected.max()) + 1
        return tuple(t[selected - lo] for t in _tensors(images.features(lo, hi)))

    def text_block(start: int, stop: int) -> tuple[torch.Tensor, ...]:
        return _tensors(text_store.features(start, stop))

    def image_to_text(q: slice, t: slice) -> np.ndarray:
        return context.model.similarity(image_block(q.start, q.stop), text_block(t.start, t.stop)).float().numpy()

    texts_of_image = [{int(position[t]) for t in s} for s in image_texts]
    image_ranks, text_ranks = M.retrieval_ranks_both_ways(image_to_text, len(rows), len(texts), texts_of_image,
                                                          block=context.block)
    metrics = {**M.retrieval_metrics_from_ranks(image_ranks, ks, prefix="image_to_text"),
               **M.retrieval_metrics_from_ranks(text_ranks, ks, prefix="text_to_image")}
    metrics.update(images=len(rows), texts=len(texts), chance_image_to_text_R5=min(1.0, 5 / len(texts)))
    return metrics, text_store, texts, texts_of_image


def _captions(store: EmbeddingStore) -> list[list[str]]:
    return [json.loads(c) for c in store.meta_column("captions")]


@torch.no_grad()
def _query_grid(context: EvalContext, text_store: EmbeddingStore, texts_of_image: list[set[int]], count: int = 4):
    """Top-5 texts for the first `count` images (green: a caption of the image)."""
    from components.eval.plots import retrieval_grid

    samples = context.sample_rows(count)
    stored_texts = text_store.meta_column("text")
    results = []
    for sample in samples:
        row = sample["store_row"]
        image_features = _tensors(context.images.features(row, row + 1))
        scores = np.concatenate([context.model.similarity(image_features, _tensors(text_store.features(a, b)))
                                 .float().numpy()[0] for a, b in text_store.blocks(4096)])
        top = np.argsort(-scores, kind="stable")[:5]
        results.append([(stored_texts[t], int(t) in texts_of_image[row]) for t in top])
    return retrieval_grid([(s["image"], ", ".join(json.loads(s["captions"]))) for s in samples], results)


def retrieval(context: EvalContext, settings: dict) -> TaskOutput:
    captions = _captions(context.images)
    metrics, text_store, _, texts_of_image = retrieval_metrics(context, captions, "captions")
    output = TaskOutput([_result(context, "zeroshot_retrieval", metrics)])
    # The grid indexes relevance by store row: only when every row has captions (then rows == store rows).
    if all(captions):
        output.images["retrieval_grid.png"] = _query_grid(context, text_store, texts_of_image,
                                                          settings.get("grid_queries", 4))
    return output


def _languages(images: EmbeddingStore, settings: dict) -> list[str]:
    languages = settings.get("languages") or [c.removeprefix("lang_") for c in _meta_columns(images)
                                              if c.startswith("lang_")]
    if not languages:
        raise ValueError("multilingual retrieval: no caption languages configured (fields.languages)")
    return languages


def _language_captions(images: EmbeddingStore, code: str) -> list[list[str]]:
    return [[c] if c else [] for c in images.meta_column(f"lang_{code}")]


def caption_sets(images: EmbeddingStore, tasks: list[str], task_settings: dict) -> dict[str, list[str]]:
    """The unique texts each retrieval-style task will score, by text-store name: the runner embeds them all
    in one pass before the tasks run."""
    lists = {}
    if "retrieval" in tasks:
        lists["captions"] = _captions(images)
    if "multilingual_retrieval" in tasks:
        for code in _languages(images, task_settings.get("multilingual_retrieval") or {}):
            lists[f"lang_{code}"] = _language_captions(images, code)
    return {name: caption_lists_relevance([c for c in captions if c])[0] for name, captions in lists.items()}


def multilingual_retrieval(context: EvalContext, settings: dict) -> TaskOutput:
    from components.eval.plots import language_bar_chart

    output, headline = TaskOutput(), settings.get("metric", "image_to_text_R5")
    chart: dict[str, float] = {}
    for code in _languages(context.images, settings):
        metrics, *_ = retrieval_metrics(context, _language_captions(context.images, code), f"lang_{code}")
        output.results.append(_result(context, "multilingual_retrieval", metrics, language=code))
        chart[code] = metrics[headline]
    output.images["multilingual_retrieval.png"] = language_bar_chart(chart, headline)
    return output


def _meta_columns(store: EmbeddingStore) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_schema(store.directory / "chunk_00000.meta.parquet").names


# -- linear probe --------------------------------------------------------------------------------------------
def linear_probe(context: EvalContext, settings: dict) -> TaskOutput:
    train = context.embed_rows("probe_train", settings["train_where"])
    label = settings["label"]
    train_y, test_y = _labels(train, label), _labels(context.images, label)
    train_x = np.concatenate([train.embeddings(a, b) for a, b in train.blocks(4096)])
    # The store keeps rows in the order Ray Data delivered them. Ordered by key, a seed draws the same images
    # (shots, validation split) on every run and for every model, so two models' probes compare pair-wise.
    order = np.argsort(np.asarray(train.meta_column("key")), kind="stable")
    train_x, train_y = train_x[order], [train_y[i] for i in order]
    test_x = np.concatenate([context.images.embeddings(a, b) for a, b in context.images.blocks(4096)])
    output = TaskOutput()
    train_y, test_y, seed = np.asarray(train_y), np.asarray(test_y), settings.get("seed", 0)
    probe = {"c_values": tuple(settings.get("c_values", (0.1, 1, 10))), "max_iter": settings.get("max_iter", 300)}
    for shots in [None, *settings.get("shots", [])]:
        if shots is None:
            metrics = M.linear_probe(train_x, train_y, test_x, test_y, seed=seed, **probe)
        else:
            metrics = M.few_shot_probe(train_x, train_y, test_x, test_y, shots, settings.get("draws", 1), seed, **probe)
        task = "linear_probe" if shots is None else f"linear_probe_{shots}shot"
        output.results.append(_result(context, task, {**metrics, "label": label}))
    return output


# -- typographic attack ----------------------------------------------------------------------------------------
class AttackRows:
    """map_batches transform: write a wrong class name on each labelled image (Unifont, see typographic.py)."""

    def __init__(self, classes: list[str], label_column: str, seed: int):
        self.classes, self.label_column, self.seed = classes, label_column, seed

    def __call__(self, batch):
        import zlib

        from components.eval.typographic import attack_image, wrong_labels

        index = {c: i for i, c in enumerate(self.classes)}
        labelled = [i for i, label in enumerate(batch[self.label_column]) if label in index]
        if not labelled:
            return batch
        # A seed per batch from its first image: the same rows get the same wrong names on every run.
        seed = self.seed + zlib.crc32(bytes(batch["image"].iloc[labelled[0]][:4096]))
        wrong = wrong_labels(np.array([index[batch[self.label_column].iloc[i]] for i in labelled]),
                             len(self.classes), seed)
        images = batch["image"].tolist()
        for row, cls in zip(labelled, wrong):
            images[row] = attack_image(images[row], self.classes[int(cls)])
        batch["image"] = images
        return batch


def typographic_attack(context: EvalContext, settings: dict) -> TaskOutput:
    """Zero-shot accuracy on clean images vs the same images with a wrong class name written on them."""
    label = settings["label"]
    labels = _labels(context.images, label)
    classes = _classes(labels)
    templates = list(settings["templates"])
    clean = zero_shot_scores(context, context.images, _class_index(labels, classes), classes, templates).result()
    attacked_store = context.embed_rows("typographic", AttackRows(classes, f"label_{label}", settings.get("seed", 0)))
    attacked_labels = _labels(attacked_store, label)
    attacked = zero_shot_scores(context, attacked_store, _class_index(attacked_labels, classes), classes,
                                templates).result()
    metrics = {"clean_acc1": clean["acc1"], "attacked_acc1": attacked["acc1"],
               "acc1_drop": clean["acc1"] - attacked["acc1"], "classes": len(classes)}
    return TaskOutput([_result(context, "typographic_attack", metrics)])


# -- token/patch alignment maps ---------------------------------------------------------------------------------
def alignment_maps(context: EvalContext, settings: dict) -> TaskOutput:
    from components.eval.alignment import alignment_maps as maps_for, token_strings
    from components.eval.plots import alignment_map_figure
    from components.models.inference import image_tensor, text_inputs

    model, output = context.model, TaskOutput()
    for index, row in enumerate(context.sample_rows(settings.get("pairs", 3))):
        caption = (json.loads(row["captions"]) or [""])[0]
        inputs = text_inputs(model, context.text, [caption])
        try:
            token_index, maps = maps_for(model, image_tensor(model, [row["image"]]), inputs)
        except NotImplementedError as error:
            print(f"[evaluate] alignment maps skipped: {error}", flush=True)
            return output
        pieces = token_strings(context.text.tokenizer, inputs["input_ids"][0])
        words = [pieces[i] for i in token_index]
        output.images[f"alignment_{index}.png"] = alignment_map_figure(row["image"], words, maps)
    return output


# -- what each task needs of the data ---------------------------------------------------------------------------
def _needs_captions(images: EmbeddingStore, settings: dict) -> str | None:
    return None if any(_captions(images)) else "no row has a caption (fields.caption)"


def _needs_label(images: EmbeddingStore, settings: dict) -> str | None:
    name = settings["label"]
    if f"label_{name}" not in _meta_columns(images):
        return f"label {name!r} is not among fields.labels"
    classes = {label for label in _labels(images, name) if label}
    return None if len(classes) >= 2 else f"label {name!r} has {len(classes)} distinct value(s) in the data"


def _needs_languages(images: EmbeddingStore, settings: dict) -> str | None:
    codes = settings.get("languages") or [c.removeprefix("lang_") for c in _meta_columns(images)
                                          if c.startswith("lang_")]
    present = [code for code in codes if f"lang_{code}" in _meta_columns(images)
               and any(images.meta_column(f"lang_{code}"))]
    return None if present else "no row has a caption in any of fields.languages"


# A task the data cannot serve is skipped with this reason (evaluation then runs the others): shards made elsewhere
# carry captions but rarely the corpus' labels or languages.
TASK_NEEDS: dict[str, Callable[[EmbeddingStore, dict], str | None]] = {
    "zeroshot_classification": _needs_label,
    "retrieval": _needs_captions,
    "linear_probe": _needs_label,
    "multilingual_retrieval": _needs_languages,
    "typographic_attack": _needs_label,
    "alignment_maps": _needs_captions,
}


def runnable_tasks(images: EmbeddingStore, tasks: list[str], task_settings: dict) -> tuple[list[str], dict[str, str]]:
    """(the tasks the data can serve, {skipped task: why}); ValueError for an unknown task."""
    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}: use some of {sorted(TASKS)}")
    skipped = {}
    for name in tasks:
        why = TASK_NEEDS[name](images, dict(task_settings.get(name) or {}))
        if why:
            skipped[name] = why
    return [name for name in tasks if name not in skipped], skipped


TASKS: dict[str, Callable[[EvalContext, dict], TaskOutput]] = {
    "zeroshot_classification": zeroshot_classification,
    "retrieval": retrieval,
    "linear_probe": linear_probe,
    "multilingual_retrieval": multilingual_retrieval,
    "typographic_attack": typographic_attack,
    "alignment_maps": alignment_maps,
}
