"""Shared fixtures: one local Ray for the session, a small built-in corpus, and the end-to-end chain whose
stages' outputs (shards, CLIP, AltCLIP, ClipCap) the slow tests read."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray

from components.data.emoji_corpus import build_corpus
from tests import cluster
from tests.cluster import WorkflowJob
from tests.helpers import listed, run_stage

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


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the session, started as the pipelines start their embedded one (2 logical CPUs per core:
    trainers and data tasks share them), and its workers inherit the S3 endpoint's settings. Every test that can
    share it does: the Ray Data and Ray Train tests and the pipelines run in this process (`run_stage`), whose
    worker processes it keeps warm between runs. Tests that kill a run or need a cluster of their own (a Ray head
    for `ray job submit`) start a process with its own Ray."""
    from components.runtime import init_ray

    init_ray(num_cpus=2 * (os.cpu_count() or 1))
    yield
    ray.shutdown()


@contextlib.contextmanager
def tracking_store(db: Path) -> Iterator[str]:
    """MLflow pointed at the sqlite store `db` while the block runs (the pipelines read MLFLOW_TRACKING_URI), then
    back to what it was; yields the store's URI."""
    import mlflow

    with pytest.MonkeyPatch.context() as patch:
        uri = point_mlflow_at(patch, db)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)


def point_mlflow_at(patch: pytest.MonkeyPatch, db: Path) -> str:
    """MLflow's process-wide state pointed at a sqlite store with no experiment chosen: a pipeline run in this
    process sets the tracking URI and the active experiment (which outrank the environment, and name an
    experiment id of another store), as a process of its own would only for itself. Returns the store's URI."""
    import mlflow

    uri = f"sqlite:///{db}"
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    patch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(None)
    return uri


def printed(function: Callable[[], object]) -> str:
    """What `function()` prints (the driver's lines and the Ray workers' lines it relays), also shown in this
    test's output."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            function()
        finally:
            sys.stdout.write(buffer.getvalue())
    return buffer.getvalue()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("emoji_corpus"), image_size=72, limit=CORPUS_LIMIT, progress=False)


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch):
    """Every test gets its own sqlite MLflow store: nothing leaks into the working directory, nor from a test or a
    pipeline run in this process that set mlflow's process-wide URI or experiment."""
    point_mlflow_at(monkeypatch, tmp_path / "mlflow.db")


@pytest.fixture(scope="session")
def emoji_shards(ray_session, tmp_path_factory) -> Path:
    """The built-in corpus (SHARD_CONCEPTS concepts; local bytes, no HTTP: the download path has its own tests),
    ingested once; the corpus lies beside the shards in corpus/."""
    work = tmp_path_factory.mktemp("emoji_shards")
    out = work / "shards"
    with tracking_store(work / "mlflow.db"):
        run_stage("ingest", "data=emoji_local", f"data.corpus_dir={work / 'corpus'}", f"data.limit={SHARD_CONCEPTS}",
                  f"data.output_dir={out}", "progress=false", cwd=work)
    return out


# The chain's stage settings: each stage long enough for the tests that read its outputs (test_pretrain,
# test_evaluate, test_clip_filter read the CLIP; test_altclip the AltCLIP; test_clipcap the captioner).
# AltCLIP's stage 1 on the corpus' 14 languages (parallel_text.cldr=false: 9,814 training pairs, the Japanese
# probe's language among 14 rather than 115): Japanese-vs-10 0.30-0.49 after 30k pairs in four runs, against
# 0.22-0.25 after 60k with CLDR's 115 languages.
ALTCLIP_STAGE1_SAMPLES = 30_000
ALTCLIP_STAGE2_SAMPLES = 3_840
# 200 steps over 1,309 training images: 0.69, 0.79 and 0.84 of training captions exact in three runs; 0.99
# after 250 steps, 0.01-0.13 after 120-150 (memorisation comes late and fast).
CLIPCAP_SAMPLES = 25_600
CLIPCAP_LM_SAMPLES = 6_400
SALTED_FRACTION = 0.3  # the share of the pool's training rows given another image's captions
# pretrain_filtered: 40 steps. From scratch the loss barely leaves ln(128) in 20 (a fall of 0.17-0.45 over runs);
# 40 steps on the session's clean shards fell by 0.81, 0.66 and 0.77 (seeds 0-2), on the filtered pool by 0.80
# and 0.92 (two suite runs).
FILTERED_SAMPLES = 5_120


def clipcap_settings(work: Path) -> list[str]:
    """train_clipcap.py overrides the chain's clipcap stage and test_clipcap's sweep share, so that the sweep
    finds the chain's decoder LM pretraining in its cache (keyed by these settings)."""
    return [f"work_dir={work / 'clipcap'}", f"tokenizer.save_dir={work / 'tokenizers'}",
            f"trainer.storage_path={work / 'ray'}", f"lm.trainer.samples={CLIPCAP_LM_SAMPLES}"]


@dataclass(frozen=True)
class Chain:
    """pipelines/end_to_end.py run twice in `work` on the built-in corpus (SHARD_CONCEPTS concepts)."""
    work: Path  # the runs' directory: data/workflow/..., the live store mlflow.db
    first: str  # what the first run printed (every stage ran)
    second: str  # what the second run printed (every stage skipped)
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


@pytest.fixture(scope="session")
def salted_pool(emoji_shards, s3_endpoint, tmp_path_factory) -> str:
    """The session's corpus ingested again with SALTED_FRACTION of its training rows' captions swapped between
    images (the truth in caption_mismatched), in a bucket of its own: the pool the chain's CLIP filters. Returns
    its location, s3://<bucket>/salted."""
    import boto3

    from components import storage

    work = tmp_path_factory.mktemp("salted")
    with tracking_store(work / "mlflow.db"):
        run_stage("ingest", "data=emoji_local", f"data.corpus_dir={emoji_shards.parent / 'corpus'}",
                  f"data.limit={SHARD_CONCEPTS}", f"data.mismatch.fraction={SALTED_FRACTION}",
                  f"data.output_dir={work / 'salted'}", "progress=false", cwd=work)
    bucket = f"clipforge-pool-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    storage.upload(work / "salted", storage.location(f"s3://{bucket}/salted"))
    return f"s3://{bucket}/salted"


CHAIN = ["ingest", "pretrain", "evaluate", "clip_filter", "pretrain_filtered", "evaluate_filtered", "altclip",
         "clipcap", "caption"]


@pytest.fixture(scope="session")
def workflow_job(s3_endpoint, emoji_shards, tmp_path_factory) -> Iterator[WorkflowJob]:
    """tests/test_ray_job.py's cluster: a Ray head, an MLflow server and the workflow submitted to the head as a job
    (tests/cluster.py), in a bucket of its own. Yields the job still running; `wait()` waits for it."""
    import boto3

    work = tmp_path_factory.mktemp("ray_job")
    bucket = f"s3://clipforge-job-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket.removeprefix("s3://"))
    with cluster.ray_head() as head, cluster.mlflow_server(bucket, work) as (tracking_uri, password):
        job = WorkflowJob.submit(head, tracking_uri, password, bucket, emoji_shards.parent / "corpus", SHARD_CONCEPTS,
                                 work)
        try:
            yield job
        finally:
            job.stop()


@pytest.fixture(scope="session")
def cluster_job_beside_the_chain(request) -> None:
    """Submits `workflow_job` before the chain when this session will run a test that reads it. The job runs on its
    own Ray head and the chain on the session's: the job's start-ups and waits fill CPU time the chain leaves idle
    (the machine is ~80% busy during the chain). Measured in one suite run: the chain took 127 s longer and the job's
    test 158 s less than when the test ran the job itself."""
    if any("workflow_job" in item.fixturenames for item in request.session.items):
        # A job that cannot start fails its own test (pytest keeps the fixture's error), not the chain's.
        with contextlib.suppress(Exception):
            request.getfixturevalue("workflow_job")


@pytest.fixture(scope="session")
def chain(emoji_shards, cluster_job_beside_the_chain, salted_pool, tmp_path_factory) -> Chain:
    """The whole chain once per session, as pipelines/end_to_end.py runs it (ingest -> pretrain -> evaluate; the
    DataComp loop: clip_filter -> pretrain_filtered -> evaluate_filtered; AltCLIP; ClipCap -> caption) on the
    session's Ray, then again (every stage skipped). Its stages' outputs are the trained models the other tests
    read: one chain instead of a pipeline run per model. The filter scores the salted pool in a bucket and writes
    its kept pairs there, which pretrain_filtered trains on."""
    work = tmp_path_factory.mktemp("chain")
    bucket = salted_pool.rsplit("/", 1)[0]
    overrides = {
        "pretrain": [f"trainer.samples={TRAINED_SAMPLES}"],
        "evaluate": ["tasks=[retrieval,zeroshot_classification]"],
        "clip_filter": [f"data.output_dir={salted_pool}", f"data.mismatch.fraction={SALTED_FRACTION}",
                        f"output={bucket}/filtered"],
        "pretrain_filtered": [f"trainer.samples={FILTERED_SAMPLES}", "trainer.log_every=5"],
        "evaluate_filtered": ["tasks=[retrieval]"],
        "altclip": ["parallel_text.cldr=false", f"stage1.trainer.samples={ALTCLIP_STAGE1_SAMPLES}",
                    f"stage2.trainer.samples={ALTCLIP_STAGE2_SAMPLES}"],
        "clipcap": [*clipcap_settings(work), f"caption.trainer.samples={CLIPCAP_SAMPLES}", "eval_samples=300",
                    "memorise_samples=200"],
        "caption": ["generate.method=greedy"],  # every kept image (~1,800): beam search took 208 s of the chain
    }
    # The session's shards as they were ingested: the ingest stage finds every part finished.
    data = [f"data.corpus_dir={emoji_shards.parent / 'corpus'}", f"data.output_dir={emoji_shards}",
            f"data.limit={SHARD_CONCEPTS}"]
    args = ["corpus=emoji_local", f"stages={listed(CHAIN)}", f"data_overrides={listed(data)}", "progress=false",
            *[f"overrides.{stage}={listed(values)}" for stage, values in overrides.items()]]
    with tracking_store(work / "mlflow.db"):
        first = printed(lambda: run_stage("end_to_end", *args, cwd=work))
        state = json.loads((work / "data" / "workflow" / "emoji_local" / "state.json").read_text())
        snapshot = work / "snapshot" / "mlflow.db"
        snapshot.parent.mkdir()
        shutil.copy(work / "mlflow.db", snapshot)
        second = printed(lambda: run_stage("end_to_end", *args, cwd=work))
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
