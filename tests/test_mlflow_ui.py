"""The MLflow server and UI as `make mlflow-ui` runs them: a real `mlflow server` (sqlite backend, local
artifact store), a short pretraining and an evaluation logged to it over HTTP, then the UI opened in headless
Chromium: the experiment's runs, the evaluation nested under its training run, the registered model's version.
The screenshot is kept in outputs/test-artifacts/."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, pretrain_args, wait_for_http

pytestmark = pytest.mark.slow

ARTIFACTS = REPO / "outputs" / "test-artifacts"


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
               f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # Its log goes to a file: an unread pipe fills with access-log lines and then blocks the server mid-request.
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", server, f"mlflow server (log: {tmp_path / 'server.log'})")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


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


def test_ui_shows_the_experiment_nested_runs_and_the_registered_version(mlflow_server, emoji_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    work = tmp_path / "train"
    subprocess.run([sys.executable, str(REPO / "pipelines" / "pretrain_clip.py"),
                    *pretrain_args(emoji_shards, work, "trainer.samples=640")],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=900)
    out = tmp_path / "eval"
    out.mkdir()
    subprocess.run([sys.executable, str(REPO / "pipelines" / "evaluate.py"), "model=models:/clipforge-clip/1",
                    f"data={emoji_shards}", "tasks=[retrieval]", "where={split: test}", f"output_dir={out}",
                    "progress=false", f"hydra.run.dir={out / 'hydra'}"],
                   cwd=out, env=env, check=True, capture_output=True, timeout=900)

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("clipforge")
    (train,) = client.search_runs([experiment.experiment_id], "tags.stage = 'pretrain'")
    (evaluation,) = client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")
    assert evaluation.data.tags["mlflow.parentRunId"] == train.info.run_id
    # The model's artifacts went through the server's artifact proxy into its artifact store.
    assert list((tmp_path / "artifacts").rglob("model.safetensors"))

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    runs_page = rendered(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs",
                         screenshot=ARTIFACTS / "mlflow-ui-runs.png")
    assert "clipforge" in runs_page and train.info.run_name in runs_page
    child_page = rendered(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{evaluation.info.run_id}")
    assert "Parent run" in child_page and train.info.run_name in child_page
    models_page = rendered(f"{mlflow_server}/#/models/clipforge-clip", screenshot=ARTIFACTS / "mlflow-ui-model.png")
    assert "Version 1" in models_page
    assert (ARTIFACTS / "mlflow-ui-runs.png").stat().st_size > 10_000
