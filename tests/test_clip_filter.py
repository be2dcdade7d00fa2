"""The CLIP-score filter: the salted corpus (known wrong captions), and pipelines/clip_filter.py scoring it with
a trained model: every row accounted for, the held-out rows untouched, the wrong captions found well above
chance, and the output a shard directory like any ingest's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from components.data.emoji_corpus import MISMATCH_COLUMN, Mismatch, _rows, _salted
from components.data.model_filter import ScoreFilter, decide_threshold, removal_quality
from tests.conftest import SHARD_CONCEPTS
from tests.helpers import REPO, read_shards, run_pipeline


def test_salting_moves_whole_caption_sets_between_training_rows_only(small_corpus):
    rows = _rows(small_corpus, None)
    salted = _salted(rows, Mismatch(0.5, seed=1, where=(("split", "train"),)))
    wrong = salted[MISMATCH_COLUMN].to_numpy()
    train = (rows["split"] == "train").to_numpy()
    assert not wrong[~train].any() and (salted[~train].equals(rows[~train].assign(**{MISMATCH_COLUMN: False})))
    assert abs(wrong.sum() - 0.5 * train.sum()) <= 2  # rows that drew their own concept's caption are not wrong
    assert (salted.loc[wrong, "caption"] != rows.loc[wrong, "caption"]).all()
    # Every language moves with the English caption: a wrong row's texts all come from one other row.
    for i in np.flatnonzero(wrong)[:10]:
        source = rows.index[rows["caption"] == salted.loc[i, "caption"]]
        assert (rows.loc[source, "caption_de"] == salted.loc[i, "caption_de"]).any()
    assert _salted(rows, None) is rows and _salted(rows, Mismatch(0.0)) is rows
    with pytest.raises(ValueError, match="mismatch.fraction"):
        _salted(rows, Mismatch(1.5))


def test_cut_keeps_the_top_fraction_or_the_threshold_and_scores_the_removal():
    scores = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    for fraction in (0.05, 0.3, 0.7, 1.0):
        cut = decide_threshold(scores, ScoreFilter(keep_fraction=fraction))
        assert (scores >= cut).sum() == round(fraction * 1000)
    assert decide_threshold(scores, ScoreFilter(threshold=0.25)) == 0.25
    with pytest.raises(ValueError, match="exactly one"):
        ScoreFilter()
    with pytest.raises(ValueError, match="keep_fraction must be in"):
        ScoreFilter(keep_fraction=0.0)

    wrong = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], bool)
    removed = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0], bool)
    quality = removal_quality(wrong, removed)
    assert (quality["precision"], quality["recall"]) == pytest.approx((2 / 3, 2 / 3))
    assert (quality["wrong_fraction_before"], quality["wrong_fraction_after"]) == pytest.approx((0.3, 1 / 7))


@pytest.mark.slow
def test_filter_finds_the_wrong_captions_and_writes_shards_that_train(chain, emoji_shards, object_store, tmp_path):
    """The salted shards in a bucket, filtered into the bucket (the scored parts, the model's copy for the actors
    and the output all live there), then read back here."""
    from components import storage

    salted = tmp_path / "salted"
    run_pipeline(["data=emoji_local", f"data.corpus_dir={emoji_shards.parent / 'corpus'}",
                  f"data.limit={SHARD_CONCEPTS}", "data.mismatch.fraction=0.3", f"data.output_dir={salted}",
                  "progress=false", f"hydra.run.dir={tmp_path / 'hydra-ingest'}"], cwd=tmp_path)
    bucket = storage.location(object_store)
    storage.upload(salted, bucket / "salted")
    uri = chain.store_copy(tmp_path)  # its registry holds the chain's CLIP
    args = ["model=models:/clipforge-clip/latest", "data=emoji_local", f"data.output_dir={bucket / 'salted'}",
            "data.mismatch.fraction=0.3", f"output={bucket / 'filtered'}", "filter.keep_fraction=0.7",
            "progress=false", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "clip_filter.py"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accounting: input" in done.stdout
    assert not (bucket / "filtered" / "_work").exists()
    filtered = storage.download(bucket / "filtered", tmp_path / "filtered")

    manifest = json.loads((filtered / "_manifest.json").read_text())
    source = json.loads((salted / "_manifest.json").read_text())
    assert manifest["input_rows"] == source["kept"] == manifest["kept"] + manifest["dropped"]["model_score"]
    kept, dropped = read_shards(filtered), pd.read_parquet(filtered / "_dropped")
    assert len(kept) == manifest["kept"] and len(dropped) == manifest["dropped"]["model_score"]
    assert {s["key"] for s in kept}.isdisjoint(dropped["key"])
    assert (dropped["status"] == "model_score").all() and (dropped["split"] == "train").all()
    assert (dropped["model_score"] < manifest["threshold"]).all()
    # The held-out rows are outside the filter's scope: all of them pass.
    assert sum(s["json"]["split"] == "test" for s in kept) == sum(
        s["json"]["split"] == "test" for s in read_shards(salted))
    assert abs(manifest["in_scope"] * 0.3 - manifest["dropped"]["model_score"]) <= 2  # ties at the cut are kept

    # The model saw the right pairs in training: it finds the wrong ones far above chance (precision 0.3).
    # Measured: precision 0.77, recall 0.79; wrong captions 29% -> 9%.
    truth = manifest["against_truth"]
    assert truth["wrong_fraction_before"] == pytest.approx(0.3, abs=0.02)
    assert truth["precision"] > 0.6 and truth["recall"] > 0.6
    assert truth["wrong_fraction_after"] < 0.15

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("clipforge").experiment_id],
                             "tags.stage = 'clip_filter'")[0]
    assert run.data.metrics["truth.precision"] == pytest.approx(truth["precision"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "filter")} >= {"filter/scores.png",
                                                                                    "filter/manifest.json"}

    # Bad input: one line, exit code 2, nothing written.
    again = subprocess.run([sys.executable, str(REPO / "pipelines" / "clip_filter.py"), *args,
                            "filter.threshold=0.2", f"output={tmp_path / 'other'}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exactly one of filter.threshold and filter.keep_fraction" in again.stderr
    assert not (tmp_path / "other").exists()
