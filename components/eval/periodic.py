"""Evaluation during training: one evaluator of components/eval/tasks.py, run every N steps inside the
training loop on a small held-out set that the driver hands to every worker. Same evaluator code as
pipelines/evaluate.py; only the embedding step differs (in the trainer process, no Ray Data pass).

Every rank runs the evaluator on the same rows, because under ZeRO-3 each forward gathers parameters from all
ranks; rank 0 logs the metrics. Evaluators that need more data passes (linear_probe, typographic_attack) are
for pipelines/evaluate.py.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from components.eval.store import EmbeddingStore
from components.eval.tasks import TASKS, EvalContext, prompt_features

IN_LOOP_TASKS = ("zeroshot_classification", "retrieval", "multilingual_retrieval")
BATCH = 64


def heldout_rows(samples: list[dict], caption_field: str, labels: dict[str, str],
                 languages: dict[str, str]) -> list[dict]:
    """Evaluator rows from ingest samples ({"image", "meta": JSON}): the shape components/eval/dataset.py gives."""
    rows = []
    for index, sample in enumerate(samples):
        meta = json.loads(sample["meta"])
        caption = meta.get(caption_field)
        rows.append({"key": str(index), "image": sample["image"],
                     "captions": json.dumps(caption if isinstance(caption, list) else [caption] if caption else []),
                     **{f"label_{name}": str(meta.get(field) or "") for name, field in labels.items()},
                     **{f"lang_{code}": str(meta.get(field) or "") for code, field in languages.items()}})
    return rows


class PeriodicEvaluation:
    def __init__(self, rows: list[dict], task: str, settings: dict[str, Any], every: int):
        if task not in IN_LOOP_TASKS:
            raise ValueError(f"evaluation during training runs one of {IN_LOOP_TASKS}, not {task!r} "
                             "(use pipelines/evaluate.py for the others)")
        if not rows:
            raise ValueError("evaluation during training needs held-out rows (data.eval_where matched none)")
        self.rows, self.task, self.settings, self.every = rows, task, settings, every

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    @torch.no_grad()
    def __call__(self, model, text) -> dict[str, float]:
        """{"eval.<task>[.<language>].<metric>": value} for the model as it is now."""
        was_training = model.training
        model.eval()
        try:
            with tempfile.TemporaryDirectory() as scratch:
                context = self._context(model, text, Path(scratch))
                output = TASKS[self.task](context, self.settings)
        finally:
            model.train(was_training)
        metrics = {}
        for result in output.results:
            language = f".{result['language']}" if result["task"] == "multilingual_retrieval" else ""
            for name, value in result["metrics"].items():
                if isinstance(value, float):
                    metrics[f"eval.{result['task']}{language}.{name}"] = value
        return metrics

    def _context(self, model, text, scratch: Path) -> EvalContext:
        from components.models.inference import image_tensor

        parameter = next(model.parameters())
        images = EmbeddingStore.create(scratch / "images")
        meta_columns = [k for k in self.rows[0] if k != "image"]
        for start in range(0, len(self.rows), BATCH):
            chunk = self.rows[start:start + BATCH]
            pixels = image_tensor(model, [r["image"] for r in chunk]).to(parameter.device, parameter.dtype)
            features = model.encode_image(pixels)
            images.append(tuple(f.float().cpu().numpy() for f in features),
                          model.image_embedding(features).float().cpu().numpy(),
                          {k: [r[k] for r in chunk] for k in meta_columns})
        def embed_texts(text_list: list[str], name: str) -> EmbeddingStore:
            store = EmbeddingStore.create(scratch / f"texts_{name}")
            for start in range(0, len(text_list), BATCH):
                part = text_list[start:start + BATCH]
                features = prompt_features(context, part)
                store.append(tuple(f.numpy() for f in features), model.text_embedding(features).numpy(),
                             {"text": part, "text_index": list(range(start, start + len(part)))})
            return store

        def no_more_passes(name: str, spec: Any) -> EmbeddingStore:
            raise ValueError(f"{self.task} needs another data pass ({name}): not available during training")

        context = EvalContext(model=model, text=text, images=images, dataset="heldout",
                              model_name="training", embed_texts=embed_texts, embed_rows=no_more_passes,
                              sample_rows=lambda count: [{**r, "store_row": i} for i, r in enumerate(self.rows[:count])])
        return context
