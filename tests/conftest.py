"""Shared fixtures: one local Ray for the session, a small built-in corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from components.data.emoji_corpus import build_corpus

CORPUS_LIMIT = 40  # concepts -> 80 images (two art styles)


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
    """Every test gets its own sqlite MLflow store: nothing leaks into the working directory."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
