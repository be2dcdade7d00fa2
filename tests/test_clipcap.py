"""ClipCap end to end, as users run it: pipelines/train_clipcap.py on the session's trained CLIP (from its MLflow
registry): decoder LM pretraining and captioning on real Ray Train + DeepSpeed, metrics against the
nearest-neighbour baseline, and the registered pyfunc captioner."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import REPO, copy_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clipcap_run(pretrained_clip, emoji_shards, tmp_path_factory):
    work = tmp_path_factory.mktemp("clipcap")
    uri = copy_store(pretrained_clip.work, work)
    args = ["clip=models:/clipforge-clip/latest", "data=emoji_local", f"data.output_dir={emoji_shards}",
            f"work_dir={work / 'clipcap'}", f"export_dir={work / 'models'}", f"tokenizer.save_dir={work / 'tok'}",
            f"trainer.storage_path={work / 'ray'}", "lm.trainer.samples=6400", "caption.trainer.samples=6400",
            "eval_samples=300", "memorise_samples=200", "progress=false", f"hydra.run.dir={work / 'hydra'}"]
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "train_clipcap.py"), *args], cwd=work,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=1500)
    if done.returncode != 0:
        raise AssertionError(f"clipcap failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return work, uri, done.stdout


def test_decoder_pretraining_lowers_heldout_perplexity_and_captions_are_scored(clipcap_run):
    work, uri, output = clipcap_run
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("clipforge")
    runs = {r.data.tags["stage"]: r for r in client.search_runs([experiment.experiment_id],
                                                                 "tags.stage LIKE 'clipcap%'")}
    assert set(runs) == {"clipcap", "clipcap-lm", "clipcap-caption"}, output
    lm = runs["clipcap-lm"].data.metrics
    assert lm["heldout.perplexity"] < 0.5 * lm["heldout.perplexity_init"], lm
    metrics = runs["clipcap"].data.metrics
    # Held out: the captioner against the nearest training caption (printed, and in MLflow). Memorising the
    # training captions (issue 6's check) needs far longer training than this test affords; not asserted yet.
    for name in ("BLEU-1", "BLEU-4", "CIDEr"):
        assert f"heldout.{name}" in metrics and f"baseline.{name}" in metrics
    assert metrics["baseline.BLEU-1"] > 0  # neighbours share words with the references
    assert "nearest-neighbour caption" in output


def test_registered_captioner_round_trips_through_pyfunc(clipcap_run, emoji_shards, monkeypatch):
    import pandas as pd

    from components.caption.model import ClipCap
    from components.caption.pyfunc import caption_images
    from components.models.factory import load_model
    from components.models.tokenizer import load_tokenizer
    from tests.helpers import read_shards

    work, uri, _ = clipcap_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    samples = [s for s in read_shards(emoji_shards) if s["json"]["split"] == "test"][:6]
    images = [s["image"] for s in samples]
    loaded = mlflow.pyfunc.load_model("models:/clipforge-clipcap/latest")
    predicted = loaded.predict(pd.DataFrame({"image": images}))["caption"].tolist()
    export = next(p for p in (work / "models").iterdir() if p.name.startswith("mlp-prefix"))
    clip_dir = work / "clipcap" / "clip"
    clip_export = next(p.parent for p in clip_dir.rglob("config.json") if (p.parent / "model.safetensors").is_file())
    direct = caption_images(load_model(clip_export), ClipCap.from_pretrained(export), load_tokenizer(export), images)
    assert predicted == direct and all(isinstance(c, str) for c in predicted)
    assert any(predicted), predicted
