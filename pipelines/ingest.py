"""Ingest: URL list (or the built-in corpus) -> filtered, deduplicated WebDataset + Parquet shards.

    python pipelines/ingest.py                                  # built-in corpus over a loopback HTTP server
    python pipelines/ingest.py data=url_list data.url_list=pairs.parquet data.output_dir=shards/mine
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from components.data import emoji_corpus
from components.data.download import DownloadConfig
from components.data.ingest import IngestError, IngestJob, run_ingest, summary
from components.data.process_part import ImageSettings, PartSettings
from components.data.url_list import UrlListError
from components.runtime import init_ray, path
from components.tracking import mlflow_runs
from components.tracking.plots import shard_sample_grid


def build_job(cfg: DictConfig, url_list: str) -> IngestJob:
    ingest = cfg.ingest
    download = OmegaConf.to_container(ingest.download, resolve=True)
    download["allow_networks"] = tuple(download["allow_networks"])
    settings = PartSettings(
        image=ImageSettings(ingest.image_size, ingest.resize_mode, ingest.encode_format, ingest.encode_quality),
        download=DownloadConfig(**download),
        filters=OmegaConf.to_container(cfg.filters, resolve=True),
    )
    return IngestJob(
        url_list=url_list, output_dir=path(cfg.data.output_dir), part_settings=settings,
        shard_size=ingest.shard_size, url_col=cfg.data.url_col, caption_col=cfg.data.caption_col,
        workers=ingest.workers, dedup_partitions=ingest.dedup_partitions, keep_staging=ingest.keep_staging,
        dataset_name=cfg.data.name,
    )


def prepare_source(cfg: DictConfig, stack: ExitStack) -> str:
    """The URL list to ingest; for the built-in corpus, build it and (for HTTP) serve it for the run."""
    data = cfg.data
    if data.source == "url_list":
        return str(path(data.url_list)) if "://" not in data.url_list else data.url_list
    corpus_dir = path(data.corpus_dir)
    emoji_corpus.build_corpus(corpus_dir, image_size=data.corpus_image_size, limit=data.limit, progress=cfg.progress)
    output_dir = path(data.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    url_list = output_dir / "_source_urls.parquet"
    if data.source == "emoji_http":
        # A fixed port keeps the URL list identical between runs, which resume relies on.
        server = stack.enter_context(emoji_corpus.serve_corpus(corpus_dir, port=data.server_port))
        emoji_corpus.write_url_list(corpus_dir, server.base_url, url_list, split=data.split)
    elif data.source == "emoji_local":
        emoji_corpus.write_local_list(corpus_dir, url_list, split=data.split)
    else:
        raise IngestError(f"unknown data.source {data.source!r}: use emoji_http, emoji_local or url_list")
    return str(url_list)


@hydra.main(config_path="../conf", config_name="ingest", version_base="1.3")
def main(cfg: DictConfig) -> None:
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    with ExitStack() as stack, mlflow_runs.start_run(cfg.mlflow.run_name, cfg.mlflow.experiment,
                                                     tags={"stage": "ingest"}) as run:
        mlflow_runs.log_params(OmegaConf.to_container(cfg, resolve=True))
        url_list = prepare_source(cfg, stack)
        job = build_job(cfg, url_list)
        manifest = run_ingest(job, progress=cfg.progress)
        counts = {"input_rows": manifest["input_rows"], "kept": manifest["kept"],
                  "samples_per_second": manifest["samples_per_second"],
                  **{f"dropped.{reason}": n for reason, n in manifest["dropped"].items()}}
        mlflow_runs.log_metrics(counts)
        mlflow_runs.log_json(manifest, "ingest/manifest.json")
        grid = shard_sample_grid(job.output_dir)
        if grid is not None:
            mlflow_runs.log_image(grid, "ingest/samples.png")
        print(summary(manifest, job.output_dir))
        print(f"MLflow run {run.info.run_id} at {mlflow_runs.tracking_uri()}  (see it: make mlflow-ui)")


if __name__ == "__main__":
    try:
        main()
    except (IngestError, UrlListError) as error:
        print(f"ingest: {error}", file=sys.stderr)
        sys.exit(2)
