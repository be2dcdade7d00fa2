"""The types of the `ingest` config group, checked when Hydra composes the config.

`conf/ingest/default.yaml` holds every value and its comment; this schema holds the types only (every field
MISSING), as `components/train/settings.py` does for the trainer group. Registered in Hydra's ConfigStore as
`ingest/schema`, which the YAML extends: `ingest.shard_size=big` or an unknown `ingest.*` key fails at parse, in
one line, before Ray starts or a URL is read (a key added with `+`, which Hydra lets past a schema, fails in
`components.runtime.check_typed_settings`, as the pipeline starts). Ranges and choices (shard_size >= 1, resize_mode) are checked where
the job is built (components/data/ingest.py, components/data/process_part.py), still before any work.
"""

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class DownloadSettings:
    timeout: float = MISSING
    retries: int = MISSING
    thread_count: int = MISSING
    max_bytes: int = MISSING
    max_redirects: int = MISSING
    allow_networks: list[str] = MISSING
    user_agent: str = MISSING
    disallowed_header_directives: list[str] = MISSING


@dataclass
class IngestSettings:
    image_size: int = MISSING
    resize_mode: str = MISSING
    encode_format: str = MISSING
    encode_quality: int = MISSING
    image_formats: list[str] = MISSING
    shard_size: int = MISSING
    shuffle_window: int = MISSING
    shuffle_seed: int = MISSING
    workers: Optional[int] = MISSING
    dedup_partitions: Optional[int] = MISSING
    append: bool = MISSING
    retry: bool = MISSING
    keep_staging: bool = MISSING
    download: DownloadSettings = MISSING


ConfigStore.instance().store(group="ingest", name="schema", node=IngestSettings)
