"""MLflow runs for every pipeline: one place that decides the tracking URI, opens (nested) runs and logs.

Default store: `sqlite:///mlflow.db` in the working directory; `MLFLOW_TRACKING_URI` wins. A stage run nests
under the active run, or under `CLIPFORGE_PARENT_RUN_ID` when an orchestrator started the stage elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow

from components.secrets import redacted_setting

DEFAULT_EXPERIMENT = "clipforge"
PARENT_RUN_ENV = "CLIPFORGE_PARENT_RUN_ID"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def configure(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point mlflow at our store and experiment; returns the tracking URI."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    return uri


@contextlib.contextmanager
def start_run(
    run_name: str,
    experiment: str = DEFAULT_EXPERIMENT,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open a run; nested under the active run, else the run named by CLIPFORGE_PARENT_RUN_ID (an orchestrator's),
    else `parent_run_id` (e.g. the training run of the model an evaluation reads)."""
    configure(experiment)
    parent = mlflow.active_run()
    parent_id = parent.info.run_id if parent else os.environ.get(PARENT_RUN_ENV) or parent_run_id
    with mlflow.start_run(run_name=run_name, nested=parent is not None, parent_run_id=parent_id, tags=dict(tags or {})) as run:
        yield run


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become their JSON text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value))
        else:
            flat[name] = value
    return flat


def log_params(config: Mapping[str, Any]) -> None:
    """Log the config flattened, credentials redacted (components/secrets.py)."""
    # MLflow caps a param value at 6000 characters; longer values are logged as artifacts by the caller.
    params = {k: str(redacted_setting(k, v))[:6000] for k, v in flatten(config).items()}
    mlflow.log_params(params)


def log_metrics(metrics: Mapping[str, float | int | None], step: int | None = None) -> None:
    """Log the numeric entries (None is skipped: a rate of an empty run, say)."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)


def log_json(obj: Any, artifact_path: str) -> None:
    """Log `obj` as a JSON artifact named `artifact_path` (e.g. "ingest/manifest.json")."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(artifact_path).name
        local.write_text(json.dumps(obj, indent=2, default=str))
        mlflow.log_artifact(str(local), artifact_path=str(Path(artifact_path).parent) or None)


def log_text(text: str, artifact_path: str) -> None:
    mlflow.log_text(text, artifact_path)


def log_image(image, artifact_path: str) -> None:
    """Log a PIL image."""
    mlflow.log_image(image, artifact_file=artifact_path)


def registered_line(outcome: Mapping[str, Any]) -> str:
    """A stage summary's registry line: the URI the other pipelines take (`model=models:/<name>/<version>`), then
    the logged model's own (the only one when registry.model_name is null)."""
    if not outcome.get("registered_version"):
        return f"logged model: {outcome['model_uri']} (not registered: registry.model_name is null)"
    return (f"registered: models:/{outcome['registered_model']}/{outcome['registered_version']} "
            f"(logged model {outcome['model_uri']})")
