"""The CLIP-score filter (DataComp): a trained model scores every pair of a shard set and the best pairs become
new shards (pipelines/clip_filter.py); in the chain, the pool the filtered CLIP trains on."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from upath import UPath

from components import storage
from components.runtime import check_typed_settings, init_ray
from components.stages.wiring import Wiring, quoted, shard_outputs, shards_exist
from components.tracking import mlflow_runs
from components.workflow import Outputs, Stage


def run(cfg: DictConfig) -> dict[str, Any]:
    from components.data import model_filter
    from components.data.shard_sets import MANIFEST, shard_files
    from components.data.sources import ensure_shards
    from components.eval.runner import fetch_model
    from components.train.trainer import resolve_use_gpu

    check_typed_settings(cfg)
    salted = not cfg.data_path and float(cfg.data.get("mismatch", {}).get("fraction") or 0) > 0
    where = cfg.filter.where if cfg.filter.where is not None else (
        {} if cfg.data_path else cfg.data.get("train_where") or {})
    spec = model_filter.ScoreFilter(  # checks the settings before anything starts
        threshold=cfg.filter.threshold, keep_fraction=cfg.filter.keep_fraction,
        where=dict(OmegaConf.to_container(OmegaConf.create(where), resolve=True)),
        truth_column=cfg.filter.truth_column or ("caption_mismatched" if salted else None))
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    source = str(cfg.data_path) if cfg.data_path else ensure_shards(cfg, "clip-filter")
    folder = shard_files(source)[0].parent  # a missing folder, or a pattern's missing shard: one line
    if (folder / "_work").is_dir() and not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"the ingest in {folder} is unfinished: run pipelines/ingest.py again to finish it")
    output = storage.location(cfg.output) if cfg.output else folder.with_name(f"{folder.name}_filtered")
    storage.check_output(output, "output", inputs=(folder,))
    mlflow_runs.configure(cfg.mlflow.experiment)
    model = fetch_model(str(cfg.model_uri), output.with_name(f".{output.name}.model"))
    with mlflow_runs.start_run(cfg.mlflow.run_name, cfg.mlflow.experiment,
                               tags={"stage": "clip_filter", "model_uri": model.uri, "data": str(source)}) as run:
        mlflow_runs.log_params(OmegaConf.to_container(cfg, resolve=True))
        manifest = model_filter.run_filter(
            source, output, model.for_workers, spec, actors=cfg.inference.actors,
            use_gpu=resolve_use_gpu(cfg.inference.use_gpu), batch_size=cfg.inference.batch_size,
            progress=cfg.progress)
        truth = manifest.get("against_truth") or {}
        mlflow_runs.log_metrics({"input_rows": manifest["input_rows"], "kept": manifest["kept"],
                                 "dropped.model_score": manifest["dropped_total"], "threshold": manifest["threshold"],
                                 **{f"truth.{k}": v for k, v in truth.items()}})
        mlflow_runs.log_json(manifest, "filter/manifest.json")
        mlflow_runs.log_image(filter_plot(output, manifest, spec), "filter/scores.png")
    print(summary(manifest, output))
    print(f"MLflow run {run.info.run_id} at {mlflow_runs.tracking_uri()}", flush=True)
    return {**manifest, "output_dir": str(output)}


def filter_plot(output: UPath, manifest: dict[str, Any], spec):
    """The histogram of the in-scope scores (split by the truth column when there is one)."""
    from components.eval.plots import score_histogram

    scores = storage.read_parquet(output / "_scores.parquet").to_pandas()
    scores = scores[scores["in_scope"]]
    wrong = scores[spec.truth_column].to_numpy(bool) if spec.truth_column else None
    return score_histogram(scores["model_score"].to_numpy(), manifest["threshold"], wrong)


def summary(manifest: dict[str, Any], output: UPath) -> str:
    lines = [f"accounting: input {manifest['input_rows']} = kept {manifest['kept']} + dropped (model_score) "
             f"{manifest['dropped_total']}; {manifest['in_scope']} rows in the filter's scope, threshold "
             f"{manifest['threshold']:.4f}"]
    truth = manifest.get("against_truth")
    if truth:
        lines.append(f"known-wrong captions: {truth['wrong']} ({truth['wrong_fraction_before']:.1%} of the scope) -> "
                     f"{truth['wrong_fraction_after']:.1%} after; precision {truth['precision']:.3f}, "
                     f"recall {truth['recall']:.3f} of the removal")
    lines.append(f"filtered shards: {output}")
    return "\n".join(lines)


def outputs(cfg: DictConfig) -> Outputs:
    manifest = run(cfg)
    return shard_outputs(storage.location(manifest["output_dir"]), kept=manifest["kept"],
                         input_rows=manifest["input_rows"], against_truth=manifest.get("against_truth"))


def stage(wiring: Wiring) -> Stage:
    def config(up: dict[str, Outputs], out: str) -> DictConfig:
        return wiring.on_model("clip_filter", "clip_filter", up, "model_uri", f"output={quoted(out)}")

    return Stage("clip_filter", ("ingest", "pretrain"), config, outputs, shards_exist)
