"""Shared fixtures: one local Ray for the session, a small built-in corpus, its shards, one trained CLIP."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray

from components.data.emoji_corpus import build_corpus
from tests.helpers import REPO, pretrain_args

CORPUS_LIMIT = 40  # concepts -> 80 images (two art styles)
SHARD_CONCEPTS = 900  # of ~1870: ~1440 training images, ~360 held-out images (~180 captions)
TRAINED_SAMPLES = 9600  # 75 steps of 128: held-out R@5 ~3x chance (tests/test_pretrain.py)


@pytest.fixture(scope="session")
def ray_local():
    from components.runtime import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("emoji_corpus"), image_size=72, limit=CORPUS_LIMIT, progress=False)


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch):
    """Every test gets its own sqlite MLflow store: nothing leaks into the working directory, nor from a test that
    set mlflow's process-wide URI (which would outrank the environment variable)."""
    import mlflow

    mlflow.set_tracking_uri(None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture(scope="session")
def emoji_shards(tmp_path_factory) -> Path:
    """The built-in corpus (local bytes, no HTTP: the download path has its own tests), ingested once."""
    work = tmp_path_factory.mktemp("emoji_shards")
    out = work / "shards"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    subprocess.run([sys.executable, str(REPO / "pipelines" / "ingest.py"), "data=emoji_local",
                    f"data.corpus_dir={work / 'corpus'}", f"data.limit={SHARD_CONCEPTS}", f"data.output_dir={out}",
                    "progress=false", f"hydra.run.dir={work / 'hydra'}"], check=True, cwd=work, env=env,
                   capture_output=True, timeout=600)
    return out


@dataclass(frozen=True)
class TrainedModel:
    work: Path  # export in work/model, its MLflow store in work/mlflow.db
    tracking_uri: str
    output: str  # the pipeline's stdout


@pytest.fixture(scope="session")
def pretrained_clip(emoji_shards, tmp_path_factory) -> TrainedModel:
    """A tiny CLIP trained by pipelines/pretrain_clip.py once per session (the pretraining and evaluation tests
    both read it), registered as clipforge-clip in its own MLflow store."""
    work = tmp_path_factory.mktemp("pretrained_clip")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "pretrain_clip.py"),
                           *pretrain_args(emoji_shards, work, f"trainer.samples={TRAINED_SAMPLES}")],
                          cwd=work, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        raise AssertionError(f"pretraining failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return TrainedModel(work, uri, done.stdout)
