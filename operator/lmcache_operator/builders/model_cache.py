"""A VLLMDeployment's model cache: downloaded weights kept where replicas and restarts find
them (``spec.model.cache``: an existing PVC, a PVC the operator creates, or a node directory),
with ``HF_HOME`` pointing into it."""

from __future__ import annotations

from typing import Any

from lmcache_operator.api.vllmdeployment import VLLMDeploymentSpec

VOLUME = "model-cache"
HF_HOME_ENV = "HF_HOME"


def pvc_name(name: str) -> str:
    return f"{name}-model-cache"


def volume_and_mount(
    name: str, spec: VLLMDeploymentSpec
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The pod's volume and the vLLM container's (writable) mount; None without a cache."""
    cache = spec.model.cache
    if cache is None:
        return None
    source: dict[str, Any]
    if cache.host_path is not None:
        source = {"hostPath": {"path": cache.host_path, "type": "DirectoryOrCreate"}}
    else:
        claim = cache.claim_name if cache.claim_name is not None else pvc_name(name)
        source = {"persistentVolumeClaim": {"claimName": claim}}
    return {"name": VOLUME, **source}, {"name": VOLUME, "mountPath": cache.mount_path}


def env(spec: VLLMDeploymentSpec) -> list[dict[str, Any]]:
    cache = spec.model.cache
    return [] if cache is None else [{"name": HF_HOME_ENV, "value": cache.mount_path}]


def build_pvc(
    name: str, namespace: str, spec: VLLMDeploymentSpec, labels: dict[str, str]
) -> dict[str, Any] | None:
    """The PVC the operator creates for ``model.cache.size`` (None for the other forms)."""
    cache = spec.model.cache
    if cache is None or cache.size is None:
        return None
    pvc_spec: dict[str, Any] = {
        "accessModes": list(cache.access_modes),
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name is not None:
        pvc_spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": pvc_name(name), "namespace": namespace, "labels": dict(labels)},
        "spec": pvc_spec,
    }
