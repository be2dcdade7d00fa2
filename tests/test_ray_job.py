"""`ray job submit` against a real Ray head, as README's "Cluster use" documents it: start a head, submit
pipelines/pretrain_clip.py and then pipelines/end_to_end.py with the repository as working dir, wait for
SUCCEEDED, read the MLflow runs and the registered models, stop the head."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.conftest import SHARD_CONCEPTS
from tests.helpers import REPO, free_port, pretrain_args, wait_for_http

pytestmark = pytest.mark.slow

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
    head = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_for_http(f"{url}/", head, "the Ray head")  # its /api/ routes answer 401 without the auth token
        yield url
    finally:
        # `ray stop` would also stop the test session's own Ray: end exactly this head's processes.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
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


def test_ray_job_submit_trains_and_registers_through_a_real_head(ray_head, emoji_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    submit(ray_head, tracking_uri, "pretrain_clip.py", pretrain_args(emoji_shards, tmp_path, "trainer.samples=640"))
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("clipforge")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'pretrain'")
    assert run.info.status == "FINISHED" and run.data.metrics["samples_seen"] >= 640 and "loss" in run.data.metrics
    (version,) = client.search_model_versions("name = 'clipforge-clip'")
    assert version.run_id == run.info.run_id
    assert (tmp_path / "model" / "model.safetensors").is_file()  # the export, written by the job's driver

    # The chained workflow as a job: its stages run on the head's cluster and nest under one parent run.
    work_dir, corpus = tmp_path / "workflow", emoji_shards.parent / "corpus"
    pretrain_overrides = ["trainer.samples=640", "eval_samples=64", f"tokenizer.save_dir={tmp_path / 'tok'}",
                          f"trainer.storage_path={tmp_path / 'ray'}"]
    submit(ray_head, tracking_uri, "end_to_end.py", [
        "stages=[ingest,pretrain]", "corpus=emoji_local", f"work_dir={work_dir}", "progress=false",
        # The session's shards as they were ingested: the ingest stage finds them finished.
        f'data_overrides=["data.output_dir={emoji_shards}","data.corpus_dir={corpus}","data.limit={SHARD_CONCEPTS}"]',
        "overrides.pretrain=[" + ",".join(f'"{o}"' for o in pretrain_overrides) + "]",
        f"hydra.run.dir={tmp_path / 'hydra'}"])
    state = json.loads((work_dir / "state.json").read_text())
    assert state["pretrain"]["outputs"]["model_uri"] == "models:/clipforge-clip/2"
    (parent,) = client.search_runs([experiment.experiment_id], "tags.stage = 'end-to-end'")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in children) == ["ingest", "pretrain"]
