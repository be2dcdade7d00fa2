"""pipelines/end_to_end.py as users run it: the whole chain once, then a second run that skips every stage.
(Which stages a changed config re-runs is tests/test_workflow.py's subject.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import CORPUS_LIMIT
from tests.helpers import REPO

pytestmark = pytest.mark.slow

CHAIN = ["ingest", "pretrain", "evaluate", "altclip", "clipcap", "caption"]
# Each stage as short as it runs: this test is about the chaining; each stage's learning has its own test.
SHORT = {
    "pretrain": ["trainer.samples=640", "eval_samples=64"],
    "evaluate": ["tasks=[retrieval,zeroshot_classification]"],
    "altclip": ["stage1.trainer.samples=1280", "stage2.trainer.samples=640", "eval_samples=64"],
    # ~30 distinct training captions here: batches of 16, so each worker's share holds a micro-batch.
    "clipcap": ["lm.trainer.samples=640", "lm.trainer.global_batch=16", "caption.trainer.samples=640",
                "caption.trainer.global_batch=16", "eval_samples=16", "memorise_samples=16"],
}


def end_to_end(work, small_corpus) -> subprocess.CompletedProcess:
    args = ["corpus=emoji_local", f'data_overrides=["data.corpus_dir={small_corpus}","data.limit={CORPUS_LIMIT}"]',
            "progress=false", f"hydra.run.dir={work / 'hydra'}"]
    args += [f"overrides.{stage}=[" + ",".join(f'"{value}"' for value in values) + "]" for stage, values in SHORT.items()]
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "end_to_end.py"), *args], cwd=work,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"},
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise AssertionError(f"end_to_end failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def actions(output: str) -> dict[str, str]:
    """stage -> "running" | "unchanged" from the driver's [end-to-end] lines."""
    found = {}
    for line in output.splitlines():
        if line.startswith("[end-to-end] "):
            stage, _, rest = line.removeprefix("[end-to-end] ").partition(": ")
            found[stage] = rest.split(" ")[0]
    return found


def test_chain_runs_once_then_skips_every_stage(tmp_path, small_corpus, monkeypatch):
    work = tmp_path
    first = end_to_end(work, small_corpus)
    assert actions(first.stdout) == {stage: "running" for stage in CHAIN}
    state = json.loads((work / "data" / "workflow" / "emoji_local" / "state.json").read_text())
    assert [state[stage]["status"] for stage in CHAIN] == ["done"] * len(CHAIN)

    # Outputs handed on as URIs: the registered versions, the shards, the captions of every kept image.
    assert state["pretrain"]["outputs"]["model_uri"] == "models:/clipforge-clip/1"
    assert state["altclip"]["outputs"]["model_uri"] == "models:/clipforge-altclip/1"
    assert state["clipcap"]["outputs"]["model_uri"] == "models:/clipforge-clipcap/1"
    kept = json.loads((work / "data" / "shards" / "emoji_local" / "_manifest.json").read_text())["kept"]
    assert state["caption"]["outputs"]["rows"] == kept and state["caption"]["outputs"]["failed"] == 0
    assert state["evaluate"]["outputs"]["metrics"]["zeroshot_retrieval.image_to_text_R5"] >= 0

    # One parent run; every stage's run nested under it (the stages' own sub-runs nest under those).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("clipforge").experiment_id
    parents = client.search_runs([experiment], "tags.stage = 'end-to-end'")
    assert len(parents) == 1
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(run.data.tags["stage"] for run in children) == sorted(CHAIN)

    second = end_to_end(work, small_corpus)
    assert actions(second.stdout) == {stage: "unchanged" for stage in CHAIN}
    assert json.loads((work / "data" / "workflow" / "emoji_local" / "state.json").read_text()) == state
    assert {str(v.version) for v in client.search_model_versions("name = 'clipforge-clip'")} == {"1"}
