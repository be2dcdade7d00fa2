"""Hydra config -> ingest job: the source to read (a URL list, or the built-in corpus served or read locally)
and the job settings. Shared by pipelines/ingest.py and every pipeline that ingests missing shards first."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from omegaconf import DictConfig, OmegaConf
from upath import UPath

from components.data import emoji_corpus
from components.data.download import DownloadConfig
from components.data.ingest import IngestError, IngestJob, run_ingest
from components.data.local_files import write_folder_list
from components.data.process_part import ImageSettings, PartSettings
from components.data.shard_sets import MANIFEST, shard_files
from components.data.url_list import UrlList, check_url_list
from components.runtime import path
from components.storage import location


def job_from_config(cfg: DictConfig, url_list: UrlList) -> IngestJob:
    ingest = cfg.ingest
    download = OmegaConf.to_container(ingest.download, resolve=True)
    for name in ("allow_networks", "disallowed_header_directives"):
        download[name] = tuple(download[name])
    settings = PartSettings(
        image=ImageSettings(ingest.image_size, ingest.resize_mode, ingest.encode_format, ingest.encode_quality,
                            tuple(ingest.image_formats)),
        download=DownloadConfig(**download),
        filters=OmegaConf.to_container(cfg.filters, resolve=True),
        local_files=cfg.data.source == "image_folder",
    )
    return IngestJob(
        url_list=url_list, output_dir=location(cfg.data.output_dir), part_settings=settings,
        shard_size=ingest.shard_size, shuffle_window=ingest.shuffle_window, shuffle_seed=ingest.shuffle_seed,
        url_col=cfg.data.url_col, caption_col=cfg.data.caption_col,
        workers=ingest.workers, dedup_partitions=ingest.dedup_partitions, keep_staging=ingest.keep_staging,
        dataset_name=cfg.data.name, append=ingest.append, retry=ingest.retry,
    )


def prepare_source(cfg: DictConfig, stack: ExitStack) -> UrlList:
    """The URL list to ingest; for the built-in corpus, build it and (for HTTP) serve it for the run."""
    data = cfg.data
    if data.source == "url_list":
        return url_list_location(cfg)
    if data.source == "image_folder":
        if data.get("root"):
            return str(write_folder_list(path(data.root), location(data.output_dir) / "_source_files.parquet"))
        return url_list_location(cfg)
    corpus_dir = path(data.corpus_dir)
    emoji_corpus.build_corpus(corpus_dir, image_size=data.corpus_image_size, limit=data.limit, progress=cfg.progress)
    url_list = location(data.output_dir) / "_source_urls.parquet"
    salt = data.get("mismatch") or {}
    mismatch = emoji_corpus.Mismatch(float(salt.get("fraction") or 0), int(salt.get("seed") or 0),
                                     tuple((salt.get("where") or {}).items()))
    if data.source == "emoji_http":
        # A fixed port keeps the URL list identical between runs, which resume relies on.
        server = stack.enter_context(emoji_corpus.serve_corpus(corpus_dir, port=data.server_port))
        emoji_corpus.write_url_list(corpus_dir, server.base_url, url_list, split=data.split, mismatch=mismatch)
    elif data.source == "emoji_local":
        emoji_corpus.write_local_list(corpus_dir, url_list, split=data.split, mismatch=mismatch)
    else:
        raise IngestError(f"unknown data.source {data.source!r}: use emoji_http, emoji_local, url_list or "
                          "image_folder (or data=webdataset for shards made elsewhere)")
    return str(url_list)


def check_source(cfg: DictConfig) -> None:
    """Refuse settings out of range, or a URL list that cannot be ingested (format, existence, columns), before
    anything starts."""
    job_from_config(cfg, url_list="")  # the job checks every setting as it is built; the list is checked below
    data = cfg.data
    if data.source == "image_folder" and bool(data.get("root")) == bool(data.get("url_list")):
        raise IngestError("data=image_folder takes data.root (a folder of image + .txt pairs) or data.url_list (a "
                          "list whose data.url_col names image files), not both or neither")
    if data.source == "image_folder" and data.root and not location(data.root).is_dir():
        raise IngestError(f"data.root {data.root} is not a folder")
    if data.source == "url_list" or (data.source == "image_folder" and data.url_list):
        check_url_list(url_list_location(cfg), data.url_col, data.caption_col)


def url_list_location(cfg: DictConfig) -> UrlList:
    """data.url_list with local entries made absolute (Hydra may change the working directory): one entry, or a
    tuple of them."""
    def absolute(entry: str) -> str:
        return entry if "://" in entry else str(path(entry))

    url_list = cfg.data.url_list
    return absolute(url_list) if isinstance(url_list, str) else tuple(absolute(str(e)) for e in url_list)


def ingest_from_config(cfg: DictConfig) -> tuple[dict[str, Any], IngestJob]:
    """Run (or finish) the ingest the config describes; returns (manifest, job)."""
    with ExitStack() as stack:
        job = job_from_config(cfg, prepare_source(cfg, stack))
        return run_ingest(job, progress=cfg.progress), job


def shards_ready(output_dir: UPath) -> bool:
    """True when an ingest finished in `output_dir` (its manifest is written last)."""
    return (UPath(output_dir) / MANIFEST).is_file()


def ensure_shards(cfg: DictConfig, stage: str) -> UPath:
    """The shard set of cfg.data: shards made elsewhere (data=webdataset) as they are, else the directory of a
    finished ingest, ingesting the built-in corpus first when it has none."""
    shard_dir = location(cfg.data.output_dir)
    if cfg.data.source == "shards":
        shard_files(shard_dir)  # a missing directory, an empty one or a pattern's missing shard: one line
        return shard_dir
    if not shards_ready(shard_dir):
        if cfg.data.source in ("url_list", "image_folder"):
            raise FileNotFoundError(f"no finished ingest in {shard_dir}: run pipelines/ingest.py with this data first")
        print(f"[{stage}] no shards in {shard_dir}: ingesting the built-in corpus first", flush=True)
        ingest_from_config(cfg)
    return shard_dir
