"""`ray job submit` against a real Ray head, as README's "Cluster use" documents it: start a head, submit
pipelines/pretrain_clip.py with the repository as working dir, wait for SUCCEEDED, read the MLflow run and
the registered model, stop the head."""

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


def test_ray_job_submit_trains_and_registers_through_a_real_head(ray_head, emoji_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job_id = f"clipforge-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # README: Ray 2.60 heads require the token
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}})
    submit = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_head, "--submission-id",
         job_id, "--working-dir", ".", "--runtime-env-json", runtime_env, "--", "python",
         "pipelines/pretrain_clip.py", *pretrain_args(emoji_shards, tmp_path, "trainer.samples=640")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert f"Job '{job_id}' succeeded" in submit.stdout + submit.stderr

    # The job API's own record (the CLI: this process's Ray client has read its auth mode already).
    status = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "status", "--address", ray_head,
                             job_id], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stderr
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("clipforge")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'pretrain'")
    assert run.info.status == "FINISHED" and run.data.metrics["samples_seen"] >= 640 and "loss" in run.data.metrics
    (version,) = client.search_model_versions("name = 'clipforge-clip'")
    assert version.run_id == run.info.run_id
    assert (tmp_path / "model" / "model.safetensors").is_file()  # the export, written by the job's driver
