"""The Ray cluster launcher configs in cluster/, validated offline against the JSON schema shipped in the ray
package (after the launcher's own default filling), plus the shapes the README promises."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.helpers import REPO

CONFIGS = {"aws-gpu.yaml": "s3://", "gcp-gpu.yaml": "gs://"}


def launcher_view(config: dict) -> dict:
    """What `ray up` validates: the config with the launcher's defaults filled in, checked against
    ray/autoscaler/ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cluster_config_passes_rays_schema_and_has_the_three_node_shapes(name):
    config = yaml.safe_load((REPO / "cluster" / name).read_text())
    launcher_view(config)
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # drivers and MLflow only: no tasks on the head
    gpu = [n for n in nodes.values() if n["resources"].get("GPU")]
    cpu = [n for n in nodes.values() if n is not head and not n["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["resources"]["GPU"] == 8 and gpu[0]["min_workers"] == 0
    assert len(cpu) == 1 and cpu[0]["resources"]["CPU"] >= 32 and cpu[0]["max_workers"] > cpu[0]["min_workers"]
    # The project is synced and installed everywhere; the MLflow server runs on the head with bucket artifacts.
    assert "." in config["file_mounts"].values()
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])
    assert any("fonts-unifont" in c for c in config["setup_commands"])
    mlflow = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(mlflow) == 1 and f"--artifacts-destination {CONFIGS[name]}" in mlflow[0]


def test_schema_check_rejects_a_broken_config():
    import jsonschema

    config = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "eight"
    with pytest.raises(jsonschema.ValidationError, match="not of type 'integer'"):
        launcher_view(config)
    config["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 8
    del config["available_node_types"]["cpu_worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        launcher_view(config)
