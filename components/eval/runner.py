"""The evaluation stage: resolve the model, embed the data with Ray Data, run the chosen evaluators, write the
results (CLIP_benchmark-shaped JSON + a table) and log everything to MLflow.

Model sources: `models:/<name>/<version>`, `models:/<name>@<alias>`, `models:/<name>/latest`, `runs:/<id>/model`,
or a local export directory. When the model came from an MLflow run, the evaluation run nests under it, and a
registry version gets the headline metrics as tags.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from upath import UPath

from components import storage
from components.eval.dataset import EvalFields, read_eval_rows
from components.eval.embed import ModelSource, ShippedExport, embed_text_sets, embed_to_store, load_export
from components.eval.store import EmbeddingStore
from components.eval.tasks import TASKS, EvalContext, caption_sets, result_file, runnable_tasks

# Per task: the metric a registry tag and the summary table carry.
HEADLINE = {"zeroshot_classification": "acc1", "zeroshot_retrieval": "image_to_text_R5",
            "multilingual_retrieval": "image_to_text_R5", "linear_probe": "acc1", "typographic_attack": "acc1_drop"}


@dataclass
class ResolvedModel:
    directory: Path  # the export on this machine: config.json, weights, tokenizer
    uri: str
    run_id: str | None = None  # the MLflow run that logged it
    registered: tuple[str, str] | None = None  # (name, version)
    shared: str | ShippedExport | None = None  # a copy Ray workers on any node load; None: `directory`

    @property
    def for_workers(self) -> ModelSource:
        return self.shared or str(self.directory)

    def shipped(self) -> ResolvedModel:
        """This model with a copy in Ray's object store for its workers, unless they already have a bucket copy:
        `directory` (scratch, or a path given on the command line) may be on the driver's disk alone."""
        if self.shared is not None:
            return self
        return dataclasses.replace(self, shared=ShippedExport.pack(self.directory, self.uri))


def resolve_model(uri: str, download_dir: Path) -> ResolvedModel:
    """A local export directory for `uri`, with its MLflow lineage when it has one."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if uri.startswith("models:/"):
        client = MlflowClient()
        match = re.fullmatch(r"models:/([^/@]+)(?:/([^/]+)|@(.+))", uri)
        if not match:
            raise ValueError(f"model URI {uri!r}: expected models:/<name>/<version|latest> or models:/<name>@<alias>")
        name, version, alias = match.groups()
        if alias:
            found = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ValueError(f"no registered model named {name!r} in {mlflow.get_tracking_uri()}")
            found = max(versions, key=lambda v: int(v.version))
        else:
            found = client.get_model_version(name, version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{found.version}",
                                                    dst_path=str(download_dir))
        return ResolvedModel(export_in(Path(local), uri), uri, found.run_id, (name, str(found.version)))
    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/", 1)[0]
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(download_dir))
        return ResolvedModel(export_in(Path(local), uri), uri, run_id)
    if "://" in uri:  # an export in an object store
        return ResolvedModel(export_in(storage.download(uri, download_dir), uri), uri, shared=uri)
    directory = Path(uri).resolve()  # absolute: Ray workers run elsewhere
    if not directory.is_dir():
        raise FileNotFoundError(f"model {uri!r} is neither an MLflow URI (models:/..., runs:/...), an object-store "
                                "URL nor a directory")
    return ResolvedModel(export_in(directory, uri), uri)


def fetch_model(uri: str, directory: UPath) -> ResolvedModel:
    """resolve_model into a fresh `directory` that the stage's Ray workers read: a local directory (on a cluster,
    a shared mount), or an object-store location, which gets a copy of the export while this process keeps its
    own (in scratch, removed at exit)."""
    storage.remove_tree(directory)
    if not storage.is_remote(directory):
        return resolve_model(uri, Path(directory))
    scratch = Path(tempfile.mkdtemp(prefix="clipforge-model-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    resolved = resolve_model(uri, scratch)
    storage.upload(resolved.directory, directory)
    return dataclasses.replace(resolved, shared=str(directory))


def export_in(root: Path, uri: str) -> Path:
    """The saved model inside a downloaded pyfunc model (its artifacts) or the directory itself."""
    if (root / "config.json").is_file():
        return root
    candidates = sorted(p.parent for p in root.rglob("config.json") if (p.parent / "model.safetensors").is_file())
    if not candidates:
        raise FileNotFoundError(f"{uri}: no saved clipforge/transformers model (config.json + model.safetensors)")
    return candidates[0]


def fields_from_config(cfg: dict) -> EvalFields:
    return EvalFields(caption=cfg["caption"], labels=dict(cfg.get("labels") or {}),
                      languages=dict(cfg.get("languages") or {}),
                      image=tuple(cfg.get("image") or EvalFields().image),
                      class_names={name: list(names) for name, names in (cfg.get("class_names") or {}).items()},
                      caption_lines=bool(cfg.get("caption_lines")))


def image_store_dir(work_dir: Path) -> Path:
    """Where `evaluate` keeps the rows' image embeddings under its work_dir."""
    return work_dir / "images"


def evaluate(cfg: dict, data_path: UPath, model: ResolvedModel, work_dir: Path, progress: bool = True,
             images: EmbeddingStore | None = None) -> list[dict]:
    """Run every task in cfg["tasks"]; returns the results (and writes them + artifacts under work_dir).
    `images`: the rows' image embeddings from an earlier evaluation of a model with the same image tower (AltCLIP's
    stages keep their teacher's), used instead of embedding the images again."""
    fields = fields_from_config(cfg["fields"])
    embed_settings = {"batch_size": cfg["batch_size"], "actors": cfg["actors"], "use_gpu": cfg["use_gpu"],
                      "progress": progress}
    where, limit = cfg.get("where"), cfg.get("limit")

    def rows(row_where=where, transform=None):
        dataset = read_eval_rows(data_path, fields, row_where, limit)
        return dataset.map_batches(transform, batch_format="pandas") if transform else dataset

    if images is None:
        started = time.perf_counter()
        images = embed_to_store(rows(), model.for_workers, "image", image_store_dir(work_dir), **embed_settings)
        if len(images) == 0:
            raise ValueError(f"no rows to evaluate in {data_path} (where {where})")
        print(f"[evaluate] {len(images)} images embedded in {time.perf_counter() - started:.1f} s", flush=True)
    tasks, skipped = runnable_tasks(images, list(cfg["tasks"]), cfg["task_settings"])
    for name, why in skipped.items():
        print(f"[evaluate] {name} skipped: {why}", flush=True)
    if not tasks:
        raise ValueError(f"none of the tasks {list(cfg['tasks'])} can run on {data_path}: "
                         + "; ".join(f"{name}: {why}" for name, why in skipped.items()))
    if skipped and mlflow.active_run():
        mlflow.set_tag("evaluate.skipped", ", ".join(skipped))
    text_stores = embed_text_sets(caption_sets(images, tasks, cfg["task_settings"]), model.for_workers,
                                  work_dir, **embed_settings)

    def embed_texts(texts: list[str], name: str) -> EmbeddingStore:
        if name not in text_stores or len(text_stores[name]) != len(texts):
            text_stores.update(embed_text_sets({name: texts}, model.for_workers, work_dir, **embed_settings))
        return text_stores[name]

    def embed_rows(name: str, spec: Any) -> EmbeddingStore:
        dataset = rows(transform=spec) if callable(spec) else rows(row_where=dict(spec))
        return embed_to_store(dataset, model.for_workers, "image", work_dir / f"images_{name}", **embed_settings)

    keys = images.meta_column("key")
    store_row = {key: i for i, key in enumerate(keys)}

    def sample_rows(count: int) -> list[dict]:
        return [{**row, "store_row": store_row[row["key"]]} for row in rows().take(count)]

    torch_model, text = load_export(model.directory)
    context = EvalContext(model=torch_model, text=text, images=images, dataset=cfg["dataset_name"],
                          model_name=model.uri, embed_texts=embed_texts,
                          embed_rows=embed_rows, sample_rows=sample_rows, block=cfg["block"])
    results: list[dict] = []
    out_dir = work_dir / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        started = time.perf_counter()
        output = TASKS[name](context, dict(cfg["task_settings"].get(name) or {}))
        print(f"[evaluate] {name}: {len(output.results)} result(s), {len(output.images)} plot(s) "
              f"in {time.perf_counter() - started:.1f} s", flush=True)
        for result in output.results:
            suffix = f"_{result['language']}" if result["task"] == "multilingual_retrieval" else ""
            (out_dir / f"{result['task']}{suffix}.json").write_text(json.dumps(result_file(result), indent=2) + "\n")
        for artifact, image in output.images.items():
            image.save(out_dir / artifact)
        results.extend(output.results)
    return results


TABLE_METRICS = ("R1", "R5", "R10", "acc1", "acc5", "recall", "drop")


def results_table(results: list[dict]) -> str:
    """One line per result: task, language, and its rates (R@k, accuracies; ranks and counts are in the JSON)."""
    lines = [f"{'task':32} {'lang':5} metrics"]
    for result in results:
        shown = {k: v for k, v in result["metrics"].items()
                 if isinstance(v, float) and k.endswith(TABLE_METRICS) and not k.startswith("chance")}
        text = "  ".join(f"{k}={v:.3f}" for k, v in shown.items())
        lines.append(f"{result['task']:32} {result['language']:5} {text}")
    return "\n".join(lines)


def headline_metrics(results: list[dict]) -> dict[str, float]:
    """{task[.language].metric: value} for the headline metric of each result (MLflow metrics, registry tags)."""
    out = {}
    for result in results:
        task = result["task"]
        key = "acc1" if task.startswith("linear_probe") else HEADLINE.get(task)
        if key in result["metrics"]:
            language = f".{result['language']}" if task == "multilingual_retrieval" else ""
            out[f"{task}{language}.{key}"] = float(result["metrics"][key])
    return out


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="clipforge-eval-"))
