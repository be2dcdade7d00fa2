"""What every stage's wiring into pipelines/end_to_end.py shares: composing a stage's config as its command line
would, the chain's settings handed to each stage, and the checks that a cached stage's outputs still exist."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from upath import UPath

import components.runtime  # noqa: F401  (registers the typed config groups that the configs extend)
from components.data.shard_sets import shard_set_digest
from components.workflow import Outputs, WorkflowError

CONF = Path(__file__).resolve().parents[2] / "conf"


def quoted(value: Any) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def stage_config(config_name: str, overrides: list[str]) -> DictConfig:
    """The config `python pipelines/<config_name>.py <overrides>` would run with (same conf/ search path)."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a script's @hydra.main
        return compose(config_name, overrides=overrides)
    with initialize_config_dir(str(CONF), version_base="1.3", job_name=config_name):
        return compose(config_name, overrides=overrides)


@dataclass(frozen=True)
class Wiring:
    """The chain's config (conf/end_to_end.yaml) as each stage reads it: the corpus, the settings every stage
    shares (Ray address, progress) and the stage's own `overrides.<stage>`."""
    cfg: DictConfig

    @property
    def corpus(self) -> list[str]:
        return [f"data={self.cfg.corpus}", *self.cfg.data_overrides]

    def overrides(self, stage: str, *wired: str) -> list[str]:
        common = [f"ray.address={quoted(self.cfg.ray.address)}" if self.cfg.ray.address else None,
                  f"++progress={self.cfg.progress}"]
        return [*[c for c in common if c], *wired, *self.cfg.overrides.get(stage, [])]

    def given(self, stage: str) -> list[str]:
        """What the chain's config itself sets for `stage` (the corpus' settings and the stage's overrides)."""
        return [*self.corpus, *self.cfg.overrides.get(stage, [])]

    @staticmethod
    def shards_of(up: dict[str, Outputs], stage: str = "ingest") -> str:
        return f"data.output_dir={quoted(up[stage]['shards'])}"

    def on_model(self, config_name: str, stage: str, up: dict[str, Outputs], setting: str, *extra: str,
                 model: str = "pretrain") -> DictConfig:
        """A stage reading the corpus' shards and a registered model (given as `setting`)."""
        return stage_config(config_name, self.overrides(stage, *self.corpus, self.shards_of(up),
                                                        f"{setting}={quoted(up[model]['model_uri'])}", *extra))


def shards_and_model(cfg: DictConfig, stage: str, model_setting: str, *stage_trainers: str):
    """What a stage that trains on a model's outputs does first (AltCLIP's teacher, ClipCap's CLIP): its settings
    checked, Ray up, the corpus' shards there, the model cfg.<model_setting> fetched into work_dir. Returns
    (shard directory, components.eval.runner.ResolvedModel)."""
    from components import storage
    from components.data.sources import ensure_shards
    from components.eval.runner import fetch_model
    from components.runtime import check_typed_settings, init_ray
    from components.tracking import mlflow_runs

    check_typed_settings(cfg, *stage_trainers)
    init_ray(cfg.ray.address, cfg.ray.num_cpus or 2 * (os.cpu_count() or 1))
    shard_dir = ensure_shards(cfg, stage)
    mlflow_runs.configure(cfg.mlflow.experiment)
    return shard_dir, fetch_model(str(cfg[model_setting]), storage.location(cfg.work_dir) / model_setting)


def registered_uri(outcome: dict[str, Any]) -> str:
    if not outcome.get("registered_version"):
        raise WorkflowError(f"the stage registered no model version ({outcome.get('registered_model')})")
    return f"models:/{outcome['registered_model']}/{outcome['registered_version']}"


def model_exists(outputs: Outputs) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, version = outputs["model_uri"].removeprefix("models:/").rsplit("/", 1)
    try:
        MlflowClient().get_model_version(name, version)
        return True
    except MlflowException:
        return False


def shards_exist(outputs: Outputs) -> bool:
    try:
        return shard_set_digest(outputs["shards"]) == outputs["manifest_digest"]
    except FileNotFoundError:
        return False


def shard_outputs(shard_dir: UPath, **extra: Any) -> Outputs:
    return {"shards": str(shard_dir), "manifest_digest": shard_set_digest(shard_dir), **extra}


def folder_exists(key: str):
    """still_valid for a stage whose output is the folder named by outputs[key]."""
    return lambda outputs: UPath(outputs[key]).is_dir()
