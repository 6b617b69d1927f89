"""cluster/ and docker/: Ray's own autoscaler validation, KubeRay resource shapes, and the
versions the images pin against pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = sorted((ROOT / "cluster").glob("*.yaml"))
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))


def ray_validate(config: dict) -> dict:
    """What `ray up` does before it launches anything: fill defaults, then schema-check."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(config)
    validate_config(config)
    return config


def test_there_are_aws_gcp_and_onprem_definitions():
    assert {p.stem for p in LAUNCHER} == {"aws-gpu", "gcp-gpu", "onprem"}
    assert {yaml.safe_load(p.read_text())["provider"]["type"] for p in LAUNCHER} == {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", LAUNCHER, ids=[p.stem for p in LAUNCHER])
def test_launcher_yaml_passes_ray_validation_and_is_secure(path):
    raw = yaml.safe_load(path.read_text())
    config = ray_validate(raw)
    assert config["cluster_name"].startswith("ptm-dist")
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "dashboard/Jobs API must stay on localhost"
    for cmds in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        assert all("RAY_AUTH_MODE=token" in c for c in cmds if "ray start" in c)
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("pip install" in c and "ptm-dist" in c for c in raw["setup_commands"])


def test_ray_validation_catches_a_misspelt_key():
    raw = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    raw["avaliable_node_types"] = raw.pop("available_node_types")
    with pytest.raises(jsonschema.ValidationError, match="avaliable_node_types"):
        ray_validate(raw)


@pytest.mark.parametrize("path", KUBERAY, ids=[p.stem for p in KUBERAY])
def test_kuberay_manifests_are_well_formed(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    assert doc["metadata"]["name"]
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].startswith("python -m ptm_dist.cli pretrain ")
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
    assert spec["rayVersion"] == _docker_pins(ROOT / "docker" / "Dockerfile.gpu")["RAY"]  # the image's Ray
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # never a LoadBalancer/NodePort by default
    pods = [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ptm-ray-token"
            assert c["image"].endswith("-gpu")


def _docker_pins(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)_VERSION=(\S+)$", path.read_text(), re.MULTILINE))


def _requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return {r.name: r for r in reqs}


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_versions_agree_with_pyproject(path):
    text = path.read_text()
    pins = _docker_pins(path)
    assert set(pins) == {"TORCH", "RAY", "DEEPSPEED", "TRANSFORMERS"}
    reqs = _requirements()
    for key, version in pins.items():
        req = reqs[key.lower()]
        assert req.specifier.contains(version), f"{path.name}: {key}={version} outside pyproject's {req}"
    assert "pip install /opt/ptm-dist" in text
    assert 'ray[default,train,tune,data]==${RAY_VERSION}' in text
