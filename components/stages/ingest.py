"""Ingest: a URL list, local images or the built-in corpus -> filtered, deduplicated WebDataset + Parquet shards
(pipelines/ingest.py); in the chain, the stage every other one reads."""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from components.data.ingest import summary
from components.data.sources import check_source, ingest_from_config, url_list_location
from components.data.url_list import list_identity
from components.runtime import check_typed_settings, init_ray
from components.stages.wiring import Wiring, quoted, shard_outputs, shards_exist, stage_config
from components.storage import location
from components.tracking import mlflow_runs
from components.tracking.plots import shard_sample_grid
from components.workflow import Outputs, Stage


def run(cfg: DictConfig) -> None:
    check_typed_settings(cfg)
    check_source(cfg)
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    with mlflow_runs.start_run(cfg.mlflow.run_name, cfg.mlflow.experiment, tags={"stage": "ingest"}) as mlflow_run:
        mlflow_runs.log_params(OmegaConf.to_container(cfg, resolve=True))
        manifest, job = ingest_from_config(cfg)
        counts = {"input_rows": manifest["input_rows"], "kept": manifest["kept"],
                  "samples_per_second": manifest["samples_per_second"],
                  **{f"dropped.{reason}": n for reason, n in manifest["dropped"].items()}}
        mlflow_runs.log_metrics(counts)
        mlflow_runs.log_json(manifest, "ingest/manifest.json")
        grid = shard_sample_grid(job.output_dir)
        if grid is not None:
            mlflow_runs.log_image(grid, "ingest/samples.png")
        print(summary(manifest, job.output_dir))
        print(f"MLflow run {mlflow_run.info.run_id} at {mlflow_runs.tracking_uri()}  (see it: make mlflow-ui)")


def config(wiring: Wiring, up: dict[str, Outputs], out: str) -> DictConfig:
    # Into the stage's keyed folder unless the data names its own: a changed ingest setting then never meets an
    # earlier run's shards (which ingest would refuse to mix with). Shards made elsewhere stay where they are.
    given = stage_config("ingest", wiring.overrides("ingest", *wiring.corpus))
    named = any(o.lstrip("+").startswith("data.output_dir=") for o in wiring.given("ingest"))
    if named or given.data.source == "shards":
        return given
    return stage_config("ingest", wiring.overrides("ingest", *wiring.corpus, f"data.output_dir={quoted(out)}"))


def url_list_digest(cfg: DictConfig) -> str:
    if cfg.data.source not in ("url_list", "image_folder") or not cfg.data.get("url_list"):
        return ""
    return json.dumps(list_identity(url_list_location(cfg)), sort_keys=True)  # path, size, mtime per file


def outputs(cfg: DictConfig) -> Outputs:
    if cfg.data.source != "shards":  # shards made elsewhere (data=webdataset) are handed on as they are
        run(cfg)
    return shard_outputs(location(cfg.data.output_dir))


def stage(wiring: Wiring) -> Stage:
    return Stage("ingest", (), lambda up, out: config(wiring, up, out), outputs, shards_exist,
                 inputs_digest=url_list_digest)
