"""pipelines/end_to_end.py: the whole chain once, then a second run that skips every stage (the session's `chain`
fixture runs both; its stages' models are the ones the slow tests examine). (Which stages a changed config re-runs
is tests/test_workflow.py's subject; the command itself runs as a Ray job in tests/test_ray_job.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import CHAIN

pytestmark = pytest.mark.slow



def actions(output: str) -> dict[str, str]:
    """stage -> "running" | "unchanged" from the driver's [end-to-end] lines."""
    found = {}
    for line in output.splitlines():
        if line.startswith("[end-to-end] "):
            stage, _, rest = line.removeprefix("[end-to-end] ").partition(": ")
            found[stage] = rest.split(" ")[0]
    return found


def test_chain_runs_once_then_skips_every_stage(chain):
    assert actions(chain.first) == {stage: "running" for stage in CHAIN}
    state = chain.state
    assert [state[stage]["status"] for stage in CHAIN] == ["done"] * len(CHAIN)

    # Outputs handed on as URIs: the registered versions, the shards, the captions of every kept image.
    assert state["pretrain"]["outputs"]["model_uri"] == "models:/clipforge-clip/1"
    assert state["altclip"]["outputs"]["model_uri"] == "models:/clipforge-altclip/1"
    assert state["clipcap"]["outputs"]["model_uri"] == "models:/clipforge-clipcap/1"
    kept = json.loads((chain.shards / "_manifest.json").read_text())["kept"]
    assert state["caption"]["outputs"]["rows"] == kept and state["caption"]["outputs"]["failed"] == 0
    # The evaluate stage hands on the held-out headline numbers of the model the pretrain stage registered: its
    # results files' own, and the model learned (tests/test_pretrain.py measures the margin).
    results = Path(state["evaluate"]["outputs"]["results_dir"])
    retrieval = json.loads((results / "zeroshot_retrieval.json").read_text())
    assert retrieval["model"] == state["pretrain"]["outputs"]["model_uri"]
    headline = state["evaluate"]["outputs"]["metrics"]["zeroshot_retrieval.image_to_text_R5"]
    assert headline == retrieval["metrics"]["image_to_text_R5"] >= 2 * retrieval["metrics"]["chance_image_to_text_R5"]

    # One parent run; every stage's run nested under it (the stages' own sub-runs nest under those).
    client = MlflowClient(f"sqlite:///{chain.snapshot}")
    experiment = client.get_experiment_by_name("clipforge").experiment_id
    parents = client.search_runs([experiment], "tags.stage = 'end-to-end'")
    assert len(parents) == 1
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    # (Each stage's run carries its pipeline's stage tag: pretrain_filtered's is a pretrain run.)
    assert sorted(run.data.tags["stage"] for run in children) == sorted(
        stage.removesuffix("_filtered") for stage in CHAIN)

    assert actions(chain.second) == {stage: "unchanged" for stage in CHAIN}
    assert json.loads((chain.work / "data" / "workflow" / "emoji_local" / "state.json").read_text()) == state
    live = MlflowClient(f"sqlite:///{chain.work / 'mlflow.db'}")
    assert {str(v.version) for v in live.search_model_versions("name = 'clipforge-clip'")} == {"1"}
