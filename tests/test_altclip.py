"""AltCLIP end to end, as users run it: the session chain's altclip stage (pipelines/distill_altclip.py with the
chain's trained CLIP as teacher, from its MLflow registry; real Ray Train + DeepSpeed for both stages), then the
registered model through pipelines/evaluate.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers import run_stage

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class AltclipRun:
    work: Path  # this module's scratch directory
    uri: str  # a copy of the chain's store
    output: str  # the chain's stdout
    teacher: Path  # the teacher's export
    exports: Path  # the AltCLIP stage's export_dir: stage1/ and final/


@pytest.fixture(scope="module")
def altclip_run(chain, pretrained_clip, tmp_path_factory) -> AltclipRun:
    work = tmp_path_factory.mktemp("altclip")
    return AltclipRun(work, chain.store_copy(work), chain.first, pretrained_clip.export, chain.output_dir("altclip"))


def runs_by_stage(client: MlflowClient) -> dict[str, object]:
    experiment = client.get_experiment_by_name("clipforge")
    runs = client.search_runs([experiment.experiment_id], "tags.stage LIKE 'altclip%'")
    return {run.data.tags["stage"]: run for run in runs}


def test_stage1_distils_the_teacher_into_a_multilingual_student(altclip_run):
    client = MlflowClient(tracking_uri=altclip_run.uri)
    runs = runs_by_stage(client)
    assert set(runs) == {"altclip", "altclip-distill", "altclip-contrastive"}, altclip_run.output
    parent = runs["altclip"].info.run_id
    assert all(runs[s].data.tags["mlflow.parentRunId"] == parent for s in ("altclip-distill", "altclip-contrastive"))
    metrics = runs["altclip-distill"].data.metrics
    # Measured here (the chain's settings, three runs on one teacher and a fourth in the suite): held-out MSE
    # 1.67-1.69 -> 0.67-0.70, cosine to the teacher 0.77; a Japanese sentence lands nearest its own English
    # sentence's teacher embedding among 10 distractors 0.30-0.49 of the time on training concepts (chance 0.091;
    # ~735 sentences, so chance +- 0.011).
    # Held-out top-1 among every English sentence (0.004-0.019, chance 0.003-0.005) is too noisy to assert.
    assert metrics["heldout.mse"] < 0.6 * metrics["heldout.init_mse"], metrics
    assert metrics["heldout.cosine"] > 0.5 > metrics["heldout.init_cosine"], metrics
    assert metrics["train.ja_vs10"] >= 2.5 * metrics["train.ja_vs10_chance"], metrics
    assert metrics["train.ja_pairs"] >= 200
    losses = [m.value for m in sorted(client.get_metric_history(runs["altclip-distill"].info.run_id, "loss"),
                                      key=lambda m: m.step)]
    assert losses[-1] < 0.6 * losses[0], losses


def test_stage2_keeps_the_image_tower_bit_identical_and_registers_with_lineage(altclip_run):
    from components.models.altclip import image_tower_state
    from components.models.factory import load_model
    from components.train.trainer import consolidated_state_dict

    uri, output, exports = altclip_run.uri, altclip_run.output, altclip_run.exports
    teacher = image_tower_state(load_model(altclip_run.teacher))
    client = MlflowClient(tracking_uri=uri)
    stage2 = runs_by_stage(client)["altclip-contrastive"]
    # What training itself holds (fp32 on CPU), not only the export: the optimizer never touched the image tower.
    checkpoint = Path(stage2.data.tags["checkpoint"])
    state = consolidated_state_dict(checkpoint)
    trained = {f"model.{k.removeprefix('model.')}": v for k, v in state.items() if k.startswith(
        ("model.vision_model.", "model.visual_projection."))}
    assert trained.keys() == teacher.keys()
    assert all(torch.equal(trained[k].reshape(teacher[k].shape), teacher[k]) for k in teacher)
    final = load_model(exports / "final")
    exported = image_tower_state(final)
    assert all(torch.equal(exported[k], teacher[k]) for k in teacher)
    # ... while the text tower moved in stage 2.
    stage1 = load_model(exports / "stage1")
    name = "model.text_projection.weight"
    assert not torch.equal(stage1.state_dict()[name], final.state_dict()[name])

    from transformers import AltCLIPModel

    AltCLIPModel.from_pretrained(exports / "final")
    versions = client.search_model_versions("name = 'clipforge-altclip'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert tags["teacher.model"] == "clipforge-clip" and tags["teacher.version"] == "1"
    assert tags["teacher.run_id"] == client.get_model_version("clipforge-clip", "1").run_id
    # The three-way comparison on held-out concepts, over all 13 other languages: the teacher, with its English
    # tokenizer, reads none of them; the student reads them all. Measured in three chains: 13-language mean R@5
    # 0.027-0.029 for the teacher (chance 0.026), 0.065-0.079 for stage 1 and 0.069-0.082 for the final model
    # (2.4-2.8x); the final model's mean was 0.074-0.095 in three other runs. Two languages alone (ja, es)
    # were too few: one chain had the teacher at 0.046 and 0.043 on them by luck and the ratio at 1.4.
    compare = runs_by_stage(client)["altclip"].data.metrics
    assert compare["compare.altclip.mean_non_en"] >= 1.5 * compare["compare.teacher.mean_non_en"], compare
    assert compare["compare.stage1.mean_non_en"] >= 1.5 * compare["compare.teacher.mean_non_en"], compare
    assert "multilingual retrieval on held-out concepts" in output


def test_registered_altclip_evaluates_through_the_evaluation_stage(ray_session, altclip_run, emoji_shards,
                                                                   monkeypatch):
    work, uri = altclip_run.work, altclip_run.uri
    out = work / "evaluation"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_stage("evaluate", "model_uri=models:/clipforge-altclip/latest", "data=emoji_local",
              f"data.output_dir={emoji_shards}", "tasks=[multilingual_retrieval,zeroshot_classification]",
              f"output_dir={out}", "progress=false", cwd=work)
    results = {path.stem.removeprefix("multilingual_retrieval_"): json.loads(path.read_text())
               for path in (out / "results").glob("multilingual_retrieval_*.json")}
    assert len(results) == 14 and results["ja"]["language"] == "ja"
    # Held-out images find their captions in the 13 other languages well above chance. Measured (the chain's
    # settings, four runs): mean R@5 0.074-0.095, 2.9-3.7x chance (0.026); each language 0.046-0.124.
    other = [r["metrics"]["image_to_text_R5"] for language, r in results.items() if language != "en"]
    chance = results["ja"]["metrics"]["chance_image_to_text_R5"]
    assert sum(other) / len(other) >= 2.0 * chance, {k: r["metrics"]["image_to_text_R5"] for k, r in results.items()}
    tags = MlflowClient(tracking_uri=uri).get_model_version("clipforge-altclip", "1").tags
    assert float(tags["eval.multilingual_retrieval.ja.image_to_text_R5"]) == pytest.approx(
        results["ja"]["metrics"]["image_to_text_R5"], abs=1e-4)
