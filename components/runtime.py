"""Process setup shared by the pipeline scripts: Ray (embedded locally or the cluster), paths."""

from __future__ import annotations

import os
from pathlib import Path

import ray
from hydra.utils import to_absolute_path

from components import QUIET_ENV


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` / RAY_ADDRESS (e.g. under `ray job submit`), else start Ray inside this process."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)  # a submitted job brings its own runtime_env (see cluster/)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": QUIET_ENV})
    # Our own tqdm bars report parts and shards; Ray Data's per-operator bars would interleave with them.
    ray.data.DataContext.get_current().enable_progress_bars = False


def path(value: str | os.PathLike) -> Path:
    """A config path relative to where the user launched the pipeline (Hydra may change the cwd)."""
    return Path(to_absolute_path(str(value)))
