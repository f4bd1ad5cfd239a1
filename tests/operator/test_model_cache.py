"""VLLMDeployment spec.model.cache: weights downloaded once per PVC or per node."""

from __future__ import annotations

from typing import Any

import pytest
from lmcache_operator.api.policy import PodPolicy
from lmcache_operator.api.vllmdeployment import VLLMDeploymentSpec
from lmcache_operator.builders.vllmdeployment import build_children
from pydantic import ValidationError


def spec_with(cache: dict[str, Any] | None, **fields: Any) -> VLLMDeploymentSpec:
    model: dict[str, Any] = {"name": "org/model"}
    if cache is not None:
        model["cache"] = cache
    return VLLMDeploymentSpec.model_validate(
        {"model": model, "cache": {"enabled": False}, **fields}
    )


def children(spec: VLLMDeploymentSpec) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in build_children("llm", "ml", spec, None)}


def pod_parts(spec: VLLMDeploymentSpec) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    pod = children(spec)["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    return volumes, mounts, env


def test_an_operator_created_pvc_holds_hf_home() -> None:
    spec = spec_with(
        {"size": "200Gi", "storageClassName": "fast", "accessModes": ["ReadWriteMany"]}
    )
    objects = children(spec)
    pvc = objects["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "llm-model-cache"
    assert pvc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "lmcache-operator"
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "200Gi"}},
        "storageClassName": "fast",
    }
    # applied first: the Deployment's pods find their claim
    kinds = [o["kind"] for o in build_children("llm", "ml", spec, None)]
    assert kinds == ["PersistentVolumeClaim", "Service", "Deployment"]
    volumes, mounts, env = pod_parts(spec)
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "llm-model-cache"}
    assert mounts["model-cache"] == {"name": "model-cache", "mountPath": "/var/cache/huggingface"}
    assert env["HF_HOME"] == "/var/cache/huggingface"


def test_an_existing_claim_or_a_node_directory() -> None:
    claimed = spec_with({"claimName": "weights", "mountPath": "/cache"})
    assert "PersistentVolumeClaim" not in children(claimed)
    volumes, _, env = pod_parts(claimed)
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "weights"}
    assert env["HF_HOME"] == "/cache"
    node = spec_with({"hostPath": "/var/lib/lmcache/models"})
    volumes, mounts, _ = pod_parts(node)
    # confined like every hostPath: the allowed prefix, the rest as a subPath
    assert volumes["model-cache"]["hostPath"]["path"] == "/var/lib/lmcache"
    assert mounts["model-cache"]["subPath"] == "models"
    assert "readOnly" not in mounts["model-cache"]  # vLLM downloads into it


def test_the_users_hf_home_wins() -> None:
    spec = spec_with({"claimName": "weights"}, engine={"env": [{"name": "HF_HOME", "value": "/x"}]})
    _, _, env = pod_parts(spec)
    assert env["HF_HOME"] == "/x"


def test_no_cache_no_volume() -> None:
    volumes, _, env = pod_parts(spec_with(None))
    assert "model-cache" not in volumes and "HF_HOME" not in env


@pytest.mark.parametrize(
    ("cache", "fragment"),
    [
        ({}, "exactly one of claimName"),
        ({"claimName": "a", "size": "1Gi"}, "exactly one of claimName"),
        ({"claimName": "a", "storageClassName": "fast"}, "set model.cache.size too"),
        ({"hostPath": "/mnt/m", "accessModes": ["ReadWriteMany"]}, "set model.cache.size too"),
        ({"size": "0"}, "greater than zero"),
        ({"hostPath": "/etc/models"}, "system directory"),
        ({"hostPath": "relative"}, "normalised absolute path"),
    ],
)
def test_invalid_caches_are_refused(cache: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        spec_with(cache)


def test_a_node_directory_must_be_under_an_allowed_prefix() -> None:
    spec = spec_with({"hostPath": "/srv/models"})
    (problem,) = spec.semantic_problems()
    assert problem.startswith("spec.model.cache.hostPath: '/srv/models' is not under an allowed")
    assert not spec.semantic_problems(PodPolicy(("/srv",)))
