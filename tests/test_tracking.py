"""The logged pyfunc's environment: pinned serving packages, never this unpublished package."""

from __future__ import annotations

from importlib.metadata import version

import mlflow


def test_logged_model_pins_the_serving_packages_and_not_this_package(tmp_path):
    from components.tracking.pyfunc import SERVING_PACKAGES, log_embedding_model

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")  # logging copies the export; it does not load it
    with mlflow.start_run():
        info = log_embedding_model(export, registered_name=None)
    lines = open(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read().split()
    assert {f"{name}=={version(name)}" for name in SERVING_PACKAGES} <= set(lines)
    assert not any(line.startswith("clipforge") for line in lines)
