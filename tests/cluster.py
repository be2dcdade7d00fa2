"""A cluster as README and cluster/README.md start one, on loopback: a Ray head (`ray start --head`, token
authentication), an MLflow server (basic-auth app, artifacts proxied into the bucket) and `ray job submit` of the
workflow. tests/test_ray_job.py reads what the job left; the session starts the job early (tests/conftest.py,
`workflow_job`) so that it runs beside the chain."""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from components.runtime import EMBEDDED_DATA_ENV
from tests.helpers import REPO, free_port, listed, server_process

MLFLOW_ACCOUNT = "clipforge-ci"
FILIP_SAMPLES = 7680  # 60 steps of 128
HEAD_PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port",
              "ray-client-server-port")


@contextlib.contextmanager
def mlflow_server(bucket: str, work: Path) -> Iterator[tuple[str, str]]:
    """`mlflow server` as the cluster configs start it on a head: MLflow's basic-auth app, whose admin is the account
    the pipelines log with (MLFLOW_ACCOUNT); sqlite runs in `work`, artifacts in the bucket (proxied by the server).
    Yields its URL and the account's password."""
    port = free_port()
    password = secrets.token_urlsafe(16)
    settings = configparser.ConfigParser()  # the cluster's file, its account store moved into `work`
    settings.read(REPO / "cluster" / "mlflow_auth.ini")
    settings["mlflow"]["database_uri"] = f"sqlite:///{work / 'accounts.db'}"
    with open(work / "basic_auth.ini", "w") as file:
        settings.write(file)
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(work / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_ACCOUNT, "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth",
               "--backend-store-uri", f"sqlite:///{work / 'server.db'}", "--artifacts-destination",
               f"{bucket}/mlflow", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with server_process(command, f"{url}/health", "mlflow server", work / "server.log", env=env):
        yield url, password


@contextlib.contextmanager
def ray_head() -> Iterator[str]:
    """`ray start --head --block` on loopback, every port free (the session's own Ray holds the defaults), its
    workers running this environment's python (README: activate .venv first). Yields the dashboard URL."""
    import psutil

    temp_dir = tempfile.mkdtemp(prefix="rayhead")  # short: Ray's socket paths must fit 107 characters
    ports = {name: free_port() for name in HEAD_PORTS}
    # One machine's cluster: Ray Data set as on the embedded Ray (a cluster keeps Ray's defaults).
    env = {**os.environ, **EMBEDDED_DATA_ENV,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
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
        # `ray stop` would also stop the test session's own Ray: end exactly this head's processes, and the workers
        # of its raylet (renamed `ray::...`, they can outlive it: a job's TrainController once did).
        head = [p for p in psutil.process_iter(["cmdline"])
                if any(temp_dir in part for part in p.info["cmdline"] or [])]
        raylets = {str(p.pid) for p in head}
        for process in [*head, *(p for p in psutil.process_iter() if raylet_of(p) in raylets)]:
            with contextlib.suppress(psutil.Error):
                process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def raylet_of(process) -> str | None:
    """The pid of the raylet that started this Ray worker (its environment says), or None."""
    import psutil

    try:
        return process.environ().get("RAY_RAYLET_PID")
    except psutil.Error:
        return None


def ray_cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("ray")), *args]


def token_auth() -> dict[str, str]:
    """The CLI's environment: Ray 2.60 heads require the token (README); this process's Ray client has read its own
    auth mode already."""
    return {**os.environ, "RAY_AUTH_MODE": "token"}


@dataclass
class WorkflowJob:
    """pipelines/end_to_end.py submitted to `head` with `ray job submit` as README shows (ingest into `bucket`, then
    FILIP pretraining under ZeRO-3 from the bucket's shards), logging to `tracking_uri` with the account."""
    head: str
    tracking_uri: str
    username: str
    password: str
    bucket: str
    work: Path  # this side's files: the submission's output, the hydra directory
    submission: subprocess.Popen
    job_id: str

    @classmethod
    def submit(cls, head: str, tracking_uri: str, password: str, bucket: str, corpus: Path, shard_concepts: int,
               work: Path) -> WorkflowJob:
        job_id = f"clipforge-test-{uuid.uuid4().hex[:8]}"
        # The job's driver and workers log with the account (on a cluster it comes from each node's
        # ~/.mlflow/credentials or the pods' Secret: cluster/README.md).
        account = {"MLFLOW_TRACKING_USERNAME": MLFLOW_ACCOUNT, "MLFLOW_TRACKING_PASSWORD": password}
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, **account}}
        # FILIP under ZeRO-3 (every parameter partitioned across the two workers) with the paper's token selection
        # before the all-gather, and held-out retrieval inside the loop every 30 steps (every rank takes part in
        # the forward passes that gather the weights); its tokenizer, checkpoints and export in the bucket.
        pretrain = [f"tokenizer.save_dir={bucket}/tok", f"trainer.storage_path={bucket}/ray", "model=filip",
                    "model.token_topk_fraction=0.25", "deepspeed=zero3", f"trainer.samples={FILIP_SAMPLES}",
                    "periodic_eval.every=30", "periodic_eval.task=retrieval", "periodic_eval.rows=2000"]
        data = [f"data.output_dir={bucket}/shards", f"data.corpus_dir={corpus}", f"data.limit={shard_concepts}"]
        workflow = ["stages=[ingest,pretrain]", "corpus=emoji_local", f"work_dir={bucket}/workflow", "progress=false",
                    f"data_overrides={listed(data)}", f"overrides.pretrain={listed(pretrain)}",
                    f"hydra.run.dir={work / 'hydra-workflow'}"]
        command = ray_cli("job", "submit", "--address", head, "--submission-id", job_id, "--working-dir", ".",
                          "--runtime-env-json", json.dumps(runtime_env), "--", "python", "pipelines/end_to_end.py",
                          *workflow)
        with open(work / "submission.log", "w") as log:
            submission = subprocess.Popen(command, cwd=REPO, env=token_auth(), stdout=log, stderr=subprocess.STDOUT)
        # Reaped as soon as it ends: meanwhile other tests walk this process's children.
        threading.Thread(target=submission.wait, daemon=True).start()
        return cls(head, tracking_uri, MLFLOW_ACCOUNT, password, bucket, work, submission, job_id)

    def wait(self, timeout: float = 900) -> str:
        """The job's id once it SUCCEEDED (the job API's own record, read through the CLI)."""
        returncode = self.submission.wait(timeout=timeout)
        output = (self.work / "submission.log").read_text()
        assert returncode == 0 and f"Job '{self.job_id}' succeeded" in output, output[-6000:]
        status = subprocess.run(ray_cli("job", "status", "--address", self.head, self.job_id), cwd=REPO,
                                env=token_auth(), capture_output=True, text=True, timeout=120, check=False)
        assert status.returncode == 0 and f"Job '{self.job_id}' succeeded" in status.stdout + status.stderr, \
            status.stderr
        return self.job_id

    def stop(self) -> None:
        if self.submission.poll() is None:
            self.submission.kill()
            self.submission.wait()
