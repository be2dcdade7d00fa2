"""Evaluation of any registered or exported model on any shards or standard dataset (pipelines/evaluate.py); in the
chain, of the pretrained CLIP and of the one trained on the filtered pairs."""

from __future__ import annotations

import shutil
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from upath import UPath

from components.data import shard_sets
from components.eval import datasets as standard_datasets
from components.eval import templates
from components.eval.benchmark_layout import BenchmarkDataset, is_benchmark_layout, read_layout
from components.eval.datasets import CLASS_LABEL
from components.runtime import check_typed_settings, init_ray
from components.stages.wiring import Wiring, folder_exists, quoted
from components.storage import location, upload
from components.tracking import mlflow_runs
from components.workflow import Outputs, Stage


def dataset_settings(settings: dict, classes: list[str] | None, **fields) -> None:
    """Point the fields and zero-shot at a dataset's class label: zero-shot chooses among every class it lists."""
    settings["fields"] = {**settings["fields"], "caption": "txt", "labels": {CLASS_LABEL: "cls"}, "languages": {},
                          **fields}
    settings["task_settings"].setdefault("zeroshot_classification", {}).update(label=CLASS_LABEL, classes=classes)


def benchmark_settings(settings: dict, dataset: BenchmarkDataset) -> tuple[UPath, list[str] | None]:
    """Read a CLIP_benchmark dataset folder as CLIP_benchmark does: its split's shards, `cls` as the class label
    named by classnames.txt, a retrieval set's `txt` as one caption per line. Returns (the split's shards, the
    dataset's own templates)."""
    dataset_settings(settings, dataset.classes, caption_lines=dataset.kind == "retrieval",
                     class_names={CLASS_LABEL: dataset.classes} if dataset.classes else {})
    return dataset.shards, dataset.templates


def run(cfg: DictConfig) -> list[dict]:
    from mlflow.tracking import MlflowClient

    from components.eval import runner

    check_typed_settings(cfg)
    settings = OmegaConf.to_container(cfg, resolve=True)
    data = location(cfg.data_path or cfg.data.output_dir)
    # A brace pattern of shards is named by its folder.
    settings["dataset_name"] = cfg.dataset_name or (data.parent.name if shard_sets.is_pattern(data) else data.name)
    own_templates = None
    if cfg.data_path and not shard_sets.is_pattern(data) and is_benchmark_layout(data, cfg.data_split):
        data, own_templates = benchmark_settings(settings, read_layout(data, cfg.data_split))
    elif cfg.data_path and not shard_sets.is_pattern(data):
        standard = standard_datasets.detect(data, cfg.data_split)
        if standard is not None:
            dataset_settings(settings, standard.classes)
            data = standard
    for task in ("zeroshot_classification", "typographic_attack"):
        task_settings = settings["task_settings"].get(task) or {}
        if "templates" in task_settings:
            task_settings["templates"] = templates.resolve(task_settings["templates"], own_templates,
                                                           f"task_settings.{task}.templates")
    # A corpus knows its held-out and training rows; other data is evaluated whole unless `where` says.
    corpus = not cfg.data_path
    if settings["where"] is None:
        settings["where"] = dict(cfg.data.get("eval_where") or {}) if corpus else {}
    probe = settings["task_settings"].get("linear_probe") or {}
    if probe.get("train_where") is None:
        probe["train_where"] = dict(cfg.data.get("train_where") or {}) if corpus else {}
    counts = {"draws": probe.get("draws", 1), **{f"shots[{i}]": k for i, k in enumerate(probe.get("shots") or [])}}
    wrong = {k: v for k, v in counts.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if wrong:
        raise ValueError("task_settings.linear_probe: " + ", ".join(f"{k}={v!r}" for k, v in wrong.items())
                         + " must be whole numbers >= 1")
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    from components.train.trainer import resolve_use_gpu

    settings["use_gpu"] = resolve_use_gpu(cfg.use_gpu)
    mlflow_runs.configure(cfg.mlflow.experiment)
    scratch = runner.scratch_dir()
    try:
        model = runner.resolve_model(str(cfg.model_uri), scratch / "model").shipped()
        out_dir = location(cfg.output_dir) if cfg.output_dir else Path(HydraConfig.get().runtime.output_dir)
        tags = {"stage": "evaluate", "model_uri": model.uri, "dataset": settings["dataset_name"]}
        with mlflow_runs.start_run(cfg.mlflow.run_name, cfg.mlflow.experiment, tags=tags,
                                   parent_run_id=model.run_id) as run:
            mlflow_runs.log_params(settings)
            results = runner.evaluate(settings, data, model, scratch, progress=cfg.progress)
            headline = runner.headline_metrics(results)
            mlflow_runs.log_metrics(headline)
            results_dir = out_dir / "results"
            upload(scratch / "results", results_dir)
            import mlflow

            mlflow.log_artifacts(str(scratch / "results"), artifact_path="evaluation")
        if model.registered:
            client = MlflowClient()
            for key, value in headline.items():
                client.set_model_version_tag(*model.registered, f"eval.{key}", f"{value:.4f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(runner.results_table(results))
    print(f"results: {results_dir}  MLflow run {run.info.run_id} at {mlflow_runs.tracking_uri()}", flush=True)
    return results


def config(wiring: Wiring, up: dict[str, Outputs], out: str, stage: str = "evaluate",
           model: str = "pretrain") -> DictConfig:
    return wiring.on_model("evaluate", stage, up, "model_uri", f"output_dir={quoted(out)}",
                           f"mlflow.run_name={stage}", model=model)


def outputs(cfg: DictConfig) -> Outputs:
    from components.eval.runner import headline_metrics

    results = run(cfg)
    return {"results_dir": str(location(cfg.output_dir) / "results"), "metrics": headline_metrics(results)}


def stage(wiring: Wiring) -> Stage:
    return Stage("evaluate", ("ingest", "pretrain"), lambda up, out: config(wiring, up, out), outputs,
                 folder_exists("results_dir"))


def filtered_stage(wiring: Wiring) -> Stage:
    return Stage("evaluate_filtered", ("ingest", "pretrain_filtered"),
                 lambda up, out: config(wiring, up, out, "evaluate_filtered", "pretrain_filtered"), outputs,
                 folder_exists("results_dir"))
