"""Cluster use as README documents it: a real Ray head (`ray start --head`), a real MLflow server (as `make
mlflow-ui` runs it, artifacts proxied) and a real S3 API on loopback as the cluster's bucket. `ray job submit` of
pipelines/end_to_end.py (ingest into the bucket) and then of pipelines/pretrain_clip.py (from the bucket's shards,
its tokenizer, checkpoints and export in the bucket), both logging to the server over HTTP; wait for SUCCEEDED, read the runs, the registered versions and the bucket, open
the UI in headless Chromium (the experiment, the stage runs nested under their parent, the model's versions;
screenshots kept in outputs/test-artifacts/), stop the head."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from components import storage
from tests.conftest import SHARD_CONCEPTS
from tests.helpers import REPO, free_port, server_process

pytestmark = pytest.mark.slow

ARTIFACTS = REPO / "outputs" / "test-artifacts"


@pytest.fixture
def mlflow_server(object_store, tmp_path):
    """`mlflow server` as on a cluster's head: sqlite runs, artifacts in the bucket (proxied by the server)."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
               f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", f"{object_store}/mlflow",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with server_process(command, f"{url}/health", "mlflow server", tmp_path / "server.log"):
        yield url


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise AssertionError("headless Chromium is missing: `make setup` installs the Debian package chromium")
    return found


def rendered(url: str, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (the UI is a single-page app that fetches from the server)."""
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=25000",
             "--window-size=1600,1000"]
    if screenshot is not None:
        subprocess.run([browser(), *flags, f"--screenshot={screenshot}", url], check=True, capture_output=True,
                       timeout=180)
    done = subprocess.run([browser(), *flags, "--dump-dom", url], check=True, capture_output=True, text=True,
                          timeout=180)
    return done.stdout


HEAD_PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port",
              "ray-client-server-port")


@pytest.fixture
def ray_head():
    """`ray start --head --block` on loopback, every port free (the session's own Ray holds the defaults), its
    workers running this environment's python (README: activate .venv first). Yields the dashboard URL."""
    import psutil

    temp_dir = tempfile.mkdtemp(prefix="rayhead")  # short: Ray's socket paths must fit 107 characters
    ports = {name: free_port() for name in HEAD_PORTS}
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address",
               "127.0.0.1", "--dashboard-host", "127.0.0.1", "--num-cpus", "4", "--temp-dir", temp_dir,
               "--disable-usage-stats", *[f"--{name}={port}" for name, port in ports.items()]]
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        # Its /api/ routes answer 401 without the auth token; / does not.
        # A test head needs no orderly shutdown (it takes ~20 s): SIGKILL follows the SIGTERM at once.
        with server_process(command, f"{url}/", "the Ray head", Path(temp_dir) / "head.log", env=env, grace_s=1):
            yield url
    finally:
        # `ray stop` would also stop the test session's own Ray: end exactly this head's processes.
        for process in psutil.process_iter(["cmdline"]):
            if any(temp_dir in part for part in process.info["cmdline"] or []):
                process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head: str, tracking_uri: str, script: str, args: list[str]) -> str:
    """`ray job submit` of pipelines/<script> as README shows; returns the job id once SUCCEEDED (the job
    API's own record, read through the CLI: this process's Ray client has read its auth mode already)."""
    job_id = f"clipforge-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # README: Ray 2.60 heads require the token
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}})
    ray_cli = str(Path(sys.executable).with_name("ray"))
    done = subprocess.run([ray_cli, "job", "submit", "--address", head, "--submission-id", job_id, "--working-dir",
                           ".", "--runtime-env-json", runtime_env, "--", "python", f"pipelines/{script}", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"Job '{job_id}' succeeded" in done.stdout + done.stderr
    status = subprocess.run([ray_cli, "job", "status", "--address", head, job_id], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stderr
    return job_id


def test_ray_jobs_log_to_the_mlflow_server_and_its_ui_shows_them(object_store, ray_head, mlflow_server, emoji_shards,
                                                                  tmp_path):
    from mlflow.tracking import MlflowClient

    from components.models.factory import load_model

    # The workflow as a job, with the bucket as the cluster's storage: ingest writes the shards there, and the
    # workflow keeps its state there. Its stage runs on the head's cluster and nests under the parent run.
    corpus, bucket = emoji_shards.parent / "corpus", storage.location(object_store)
    work_dir = bucket / "workflow"
    submit(ray_head, mlflow_server, "end_to_end.py", [
        "stages=[ingest]", "corpus=emoji_local", f"work_dir={work_dir}", "progress=false",
        f'data_overrides=["data.output_dir={bucket / "shards"}","data.corpus_dir={corpus}",'
        f'"data.limit={SHARD_CONCEPTS}"]', f"hydra.run.dir={tmp_path / 'hydra-workflow'}"])
    state = json.loads((work_dir / "state.json").read_text())
    assert state["ingest"]["status"] == "done" and state["ingest"]["outputs"]["shards"] == str(bucket / "shards")
    # The session's corpus ingested into the bucket gives the session's shards (ingested onto a disk), byte for byte.
    disk_files = sorted(p.name for p in emoji_shards.glob("[0-9]*"))
    assert sorted(p.name for p in (bucket / "shards").glob("[0-9]*")) == disk_files and len(disk_files) == 6
    for name in (n for n in disk_files if n.endswith(".tar")):
        assert (bucket / "shards" / name).read_bytes() == (emoji_shards / name).read_bytes()
    assert not (bucket / "shards" / "_work" / "staging").exists()  # staging is removed, as on a disk
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("clipforge")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.stage = 'end-to-end'")
    (child,) = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert child.data.tags["stage"] == "ingest"

    # Pretraining from the bucket's shards, its tokenizer, checkpoints and export in the bucket. ZeRO-3 in bf16 with
    # the SigLIP loss (its bias is one more partitioned parameter) and zero-shot evaluation inside the loop (every
    # rank takes part in the forward passes that gather the weights): 4 steps.
    submit(ray_head, mlflow_server, "pretrain_clip.py", [
        "data=emoji_local", f"data.output_dir={bucket / 'shards'}", f"export_dir={bucket / 'model'}",
        f"tokenizer.save_dir={bucket / 'tok'}", f"trainer.storage_path={bucket / 'ray'}", "progress=false",
        "deepspeed=zero3", "deepspeed.bf16.enabled=true", "loss.kind=siglip", "periodic_eval.every=2",
        "periodic_eval.rows=64", "trainer.samples=256", "trainer.global_batch=64", "trainer.log_every=1",
        "eval_samples=64", f"hydra.run.dir={tmp_path / 'hydra-pretrain'}"])
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'pretrain'")
    assert run.info.status == "FINISHED" and run.data.metrics["samples_seen"] == 256
    curve = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [step for step, _ in curve] == [1, 2, 3, 4] and all(math.isfinite(v) for _, v in curve)
    assert "logit_bias" in run.data.metrics
    evaluated = client.get_metric_history(run.info.run_id, "eval.zeroshot_classification.acc5")
    assert sorted(m.step for m in evaluated) == [2, 4] and all(0 <= m.value <= 1 for m in evaluated)
    (version,) = client.search_model_versions("name = 'clipforge-clip'")
    assert version.run_id == run.info.run_id
    # The export, written into the bucket by the job's driver from the partitioned checkpoint.
    with storage.local_copy(bucket / "model") as export:
        model = load_model(export)
    assert model.family == "clip" and model.logit_bias is not None and model.num_parameters() > 500_000
    (tokenizer_dir,) = (bucket / "tok").iterdir()
    assert (tokenizer_dir / "tokenizer.json").is_file()
    checkpoint = run.data.tags["checkpoint"]
    assert checkpoint.startswith(f"{bucket / 'ray'}/") and (storage.location(checkpoint) / "trainer_state.json").is_file()
    # The model's artifacts went through the server's artifact proxy into its artifact store, in the bucket.
    assert list((bucket / "mlflow").rglob("model.safetensors"))

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    runs_page = rendered(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs",
                         screenshot=ARTIFACTS / "mlflow-ui-runs.png")
    assert "clipforge" in runs_page and run.info.run_name in runs_page and parent.info.run_name in runs_page
    child_page = rendered(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/"
                          f"{child.info.run_id}")
    assert "Parent run" in child_page and parent.info.run_name in child_page
    models_page = rendered(f"{mlflow_server}/#/models/clipforge-clip", screenshot=ARTIFACTS / "mlflow-ui-model.png")
    assert "Version 1" in models_page
    assert (ARTIFACTS / "mlflow-ui-runs.png").stat().st_size > 10_000
