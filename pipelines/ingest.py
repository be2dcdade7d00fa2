"""Ingest: URL list (or the built-in corpus) -> filtered, deduplicated WebDataset + Parquet shards.

    python pipelines/ingest.py                                  # built-in corpus over a loopback HTTP server
    python pipelines/ingest.py data=url_list data.url_list=pairs.parquet data.output_dir=shards/mine
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from components.data.ingest import IngestError
from components.data.url_list import UrlListError
from components.runtime import one_line_errors
from components.stages import ingest


@hydra.main(config_path="../conf", config_name="ingest", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("ingest", IngestError, UrlListError, ValueError, FileNotFoundError):
        ingest.run(cfg)


if __name__ == "__main__":
    main()
