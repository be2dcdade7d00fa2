"""Ingest: URL list (or the built-in corpus) -> filtered, deduplicated WebDataset + Parquet shards.

    python pipelines/ingest.py                                  # built-in corpus over a loopback HTTP server
    python pipelines/ingest.py data=url_list data.url_list=pairs.parquet data.output_dir=shards/mine
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from components.data.ingest import IngestError, summary
from components.data.sources import check_source, ingest_from_config
from components.data.url_list import UrlListError
from components.runtime import check_typed_settings, init_ray, one_line_errors
from components.tracking import mlflow_runs
from components.tracking.plots import shard_sample_grid


@hydra.main(config_path="../conf", config_name="ingest", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("ingest", IngestError, UrlListError, ValueError, FileNotFoundError):
        ingest(cfg)


def ingest(cfg: DictConfig) -> None:
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


if __name__ == "__main__":
    main()
