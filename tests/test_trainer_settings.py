"""The typed config groups (trainer: components/train/settings.py, ingest: components/data/settings.py): checked when
the config is parsed, each setting in one place."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

from components.train.loop import LoopSettings
from components.train.settings import trainer_defaults
from tests.helpers import pipeline_command


def test_the_loop_takes_every_trainer_value_from_the_config():
    trainer = trainer_defaults()
    settings = LoopSettings.from_trainer(trainer)
    shared = [f.name for f in dataclasses.fields(LoopSettings) if f.name in trainer]
    assert len(shared) == 11 and all(getattr(settings, name) == trainer[name] for name in shared)
    assert isinstance(trainer.lr, float) and isinstance(trainer.workers, int)  # typed, not YAML's guesses
    with pytest.raises(TypeError):  # no default of its own to disagree with the config
        LoopSettings(samples=128, global_batch=128)


@pytest.mark.parametrize("pipeline, override, message", [
    ("pretrain_clip", "trainer.lr=abc", "Error merging override trainer.lr=abc"),
    ("pretrain_clip", "trainer.workers=1.5", "Error merging override trainer.workers=1.5"),
    ("pretrain_clip", "trainer.lrate=0.1", "Could not override 'trainer.lrate'"),
    ("pretrain_clip", "trainer.compile=maybe", "trainer.compile must be auto, true or false, got 'maybe'"),
    ("distill_altclip", "stage1.trainer.lr=abc", "altclip: stage1.trainer: Value 'abc' of type 'str' could not be "
                                                 "converted to Float"),
    ("train_clipcap", "+caption.trainer.lrate=0.1", "clipcap: caption.trainer: Key 'lrate' not in 'TrainerSettings'"),
    # Hydra adds a `+` key past the schema (its own hint for an unknown key); the pipeline refuses it.
    ("pretrain_clip", "+trainer.lrate=0.1", "pretrain: trainer: Key 'lrate' not in 'TrainerSettings'"),
    ("ingest", "ingest.shard_size=big", "Error merging override ingest.shard_size=big"),
    ("ingest", "+ingest.download.time_out=5", "ingest: ingest: Key 'time_out' not in 'DownloadSettings'"),
    ("pretrain_clip", "model.temperature_init=hot", "Error merging override model.temperature_init=hot"),
    ("pretrain_clip", "+model.embed=1", "pretrain: model: Key 'embed' not in 'ModelSettings'"),
    # The runtime group every stage shares (conf/runtime/default.yaml).
    ("evaluate", "ray.num_cpus=abc", "evaluate: ray: Value 'abc' of type 'str' could not be converted to Integer"),
])
def test_a_mistyped_or_unknown_setting_is_refused_before_anything_starts(tmp_path, pipeline, override, message):
    done = subprocess.run(pipeline_command([override], pipeline), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
    assert not list(tmp_path.iterdir()) or {p.name for p in tmp_path.iterdir()} == {"outputs"}  # no store, no data
