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
])
def test_a_mistyped_or_unknown_setting_is_refused_before_anything_starts(tmp_path, pipeline, override, message):
    done = subprocess.run(pipeline_command([override], pipeline), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
    assert not list(tmp_path.iterdir()) or {p.name for p in tmp_path.iterdir()} == {"outputs"}  # no store, no data


@pytest.mark.parametrize("config, override, message", [
    ("pretrain_clip", "model.temperature_init=hot", "Error merging override model.temperature_init=hot"),
    ("pretrain_clip", "+model.embed=1", "model: Key 'embed' not in 'ModelSettings'"),
    ("pretrain_clip", "model=clippo model.font_size=big", "Error merging override model.font_size=big"),
    # The runtime group every stage shares (conf/runtime/default.yaml).
    ("evaluate", "ray.num_cpus=abc", "ray: Value 'abc' of type 'str' could not be converted to Integer"),
    ("caption", "+mlflow.tracking=x", "mlflow: Key 'tracking' not in 'MlflowSettings'"),
    ("end_to_end", "progress=maybe", "progress='maybe': use true or false"),
])
def test_the_model_and_runtime_settings_are_typed(config, override, message):
    """The same checks in this process, as each stage runs them first (the command line's one line and exit code 2
    are the case above): a wrong type at parse, a `+` key as the stage starts."""
    from components.runtime import check_typed_settings
    from components.stages.wiring import stage_config

    with pytest.raises(Exception) as refused:
        check_typed_settings(stage_config(config, override.split()))
    assert message in str(refused.value), str(refused.value)
