"""Shared fixtures: one local Ray for the session, a small built-in corpus, and the end-to-end chain whose
stages' outputs (shards, CLIP, AltCLIP, ClipCap) the slow tests read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray

from components.data.emoji_corpus import build_corpus
from tests.helpers import REPO

CORPUS_LIMIT = 40  # concepts -> 80 images (two art styles)
SHARD_CONCEPTS = 900  # of ~1870: ~1440 training images, ~360 held-out images (~180 captions)
TRAINED_SAMPLES = 9600  # 75 steps of 128: held-out R@5 ~3x chance (tests/test_pretrain.py)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API on loopback (moto's server) for the whole session; yields its URL. The AWS_* variables point
    this process and everything it starts (pipelines, the session's Ray and its workers, a Ray head, an MLflow
    server) at it, as they would point a cluster at its bucket, and keep every S3 client off real endpoints."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    settings = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "clipforge", "AWS_SECRET_ACCESS_KEY": "clipforge",
                "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def object_store(s3_endpoint) -> str:
    """An empty bucket of the test's own on the session's S3 server; returns its URL, s3://<bucket>."""
    import boto3

    bucket = f"clipforge-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    """A local Ray for the module's tests; its workers inherit the S3 endpoint's settings (set before it starts).
    Per module, not per session: an idle Ray takes ~4% of a 2-core machine, which the slow pipeline tests in
    the modules between would pay for (each pipeline starts its own Ray)."""
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
    """The built-in corpus (SHARD_CONCEPTS concepts; local bytes, no HTTP: the download path has its own tests),
    ingested once; the corpus lies beside the shards in corpus/."""
    work = tmp_path_factory.mktemp("emoji_shards")
    out = work / "shards"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    subprocess.run([sys.executable, str(REPO / "pipelines" / "ingest.py"), "data=emoji_local",
                    f"data.corpus_dir={work / 'corpus'}", f"data.limit={SHARD_CONCEPTS}", f"data.output_dir={out}",
                    "progress=false", f"hydra.run.dir={work / 'hydra'}"], check=True, cwd=work, env=env,
                   capture_output=True, timeout=600)
    return out


# The chain's stage settings: each stage long enough for the tests that read its outputs (test_pretrain,
# test_evaluate, test_clip_filter read the CLIP; test_altclip the AltCLIP; test_clipcap the captioner).
ALTCLIP_STAGE1_SAMPLES = 60_000  # Japanese-vs-10 at 40k was 0.159 against the 0.146 bar: too thin
ALTCLIP_STAGE2_SAMPLES = 3_840
# 200 steps over 1,309 training images: measured 0.99 of training captions exact after 250 steps, 0.08 after
# 150 (memorisation comes late and fast).
CLIPCAP_SAMPLES = 25_600
CLIPCAP_LM_SAMPLES = 6_400


def clipcap_settings(work: Path) -> list[str]:
    """train_clipcap.py overrides the chain's clipcap stage and test_clipcap's sweep share, so that the sweep
    finds the chain's decoder LM pretraining in its cache (keyed by these settings)."""
    return [f"work_dir={work / 'clipcap'}", f"tokenizer.save_dir={work / 'tokenizers'}",
            f"trainer.storage_path={work / 'ray'}", f"lm.trainer.samples={CLIPCAP_LM_SAMPLES}"]


@dataclass(frozen=True)
class Chain:
    """pipelines/end_to_end.py run twice in `work` on the built-in corpus (SHARD_CONCEPTS concepts)."""
    work: Path  # the runs' working directory: data/workflow/..., the live store mlflow.db
    first: str  # stdout of the first run (every stage ran)
    second: str  # stdout of the second run (every stage skipped)
    state: dict  # state.json after the first run
    snapshot: Path  # the MLflow store as the first run left it (the second run adds its "unchanged" runs)

    @property
    def shards(self) -> Path:
        return Path(self.state["ingest"]["outputs"]["shards"])

    def output_dir(self, stage: str) -> Path:
        """A stage's output directory (named by its cache key)."""
        return self.work / "data" / "workflow" / "emoji_local" / stage / self.state[stage]["key"]

    def store_copy(self, work: Path) -> str:
        """A copy of the snapshot store in `work` (registry included); returns its URI. Artifact locations are
        absolute, so the copy reads the chain's artifacts."""
        shutil.copy(self.snapshot, work / "mlflow.db")
        return f"sqlite:///{work / 'mlflow.db'}"


def run_end_to_end(work: Path, *args: str, timeout: float) -> str:
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "end_to_end.py"), *args,
                           f"hydra.run.dir={work / 'hydra'}"], cwd=work,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"},
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"end_to_end failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def listed(values: list[str]) -> str:
    """A Hydra list override's value with every item quoted (paths hold characters Hydra would parse)."""
    return "[" + ",".join(f'"{value}"' for value in values) + "]"


@pytest.fixture(scope="session")
def chain(emoji_shards, tmp_path_factory) -> Chain:
    """The whole chain once per session, as users run it (ingest -> pretrain -> evaluate -> AltCLIP -> ClipCap ->
    caption), then again (every stage skipped). Its stages' outputs are the trained models the other tests read:
    one chain instead of a pipeline run per model."""
    work = tmp_path_factory.mktemp("chain")
    overrides = {
        "pretrain": [f"trainer.samples={TRAINED_SAMPLES}"],
        "evaluate": ["tasks=[retrieval,zeroshot_classification]"],
        # The comparison in three languages: its 14 took ~100 s of the chain (test_evaluate covers all 14).
        "altclip": [f"stage1.trainer.samples={ALTCLIP_STAGE1_SAMPLES}",
                    f"stage2.trainer.samples={ALTCLIP_STAGE2_SAMPLES}", "compare.languages=[en,ja,es]"],
        "clipcap": [*clipcap_settings(work), f"caption.trainer.samples={CLIPCAP_SAMPLES}", "eval_samples=300",
                    "memorise_samples=200"],
        "caption": ["generate.method=greedy"],  # every kept image (~1,800): beam search took 208 s of the chain
    }
    # The session's shards as they were ingested: the ingest stage finds every part finished.
    data = [f"data.corpus_dir={emoji_shards.parent / 'corpus'}", f"data.output_dir={emoji_shards}",
            f"data.limit={SHARD_CONCEPTS}"]
    args = ["corpus=emoji_local", f"data_overrides={listed(data)}", "progress=false",
            *[f"overrides.{stage}={listed(values)}" for stage, values in overrides.items()]]
    first = run_end_to_end(work, *args, timeout=3600)
    state = json.loads((work / "data" / "workflow" / "emoji_local" / "state.json").read_text())
    snapshot = work / "snapshot" / "mlflow.db"
    snapshot.parent.mkdir()
    shutil.copy(work / "mlflow.db", snapshot)
    second = run_end_to_end(work, *args, timeout=600)
    return Chain(work, first, second, state, snapshot)


@dataclass(frozen=True)
class TrainedModel:
    export: Path  # the exported model directory
    tracking_uri: str  # an MLflow store whose registry holds it as clipforge-clip version 1
    output: str  # the stdout of the pipeline that trained it


@pytest.fixture(scope="session")
def pretrained_clip(chain, tmp_path_factory) -> TrainedModel:
    """The chain's tiny CLIP (TRAINED_SAMPLES), with a copy of the chain's store that the pretraining, evaluation
    and filter tests share."""
    return TrainedModel(chain.output_dir("pretrain"), chain.store_copy(tmp_path_factory.mktemp("pretrained_clip")),
                        chain.first)
