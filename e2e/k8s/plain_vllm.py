"""A plain Deployment of the stock vLLM CPU image, without our CRD: the webhook wires it.

What a user with their own vLLM manifests does: label the pod template
``lmcache.dev/cluster: <LMCacheCluster>``. The pod runs ``vllm serve`` (the image's venv
script), so the operator's webhook adds ``--kv-transfer-config`` to its arguments and the env,
volumes, client credentials and node selection of the cluster's connection contract.
"""

from __future__ import annotations

from typing import Any

from e2e.k8s.conftest import Settings
from e2e.k8s.kube import Kube

NAME = "plain-vllm"
PORT = 8000
SERVED_MODEL = "model"
MODEL_MOUNT = "/models/model"


def build(settings: Settings, model_dir: str, cluster: str) -> list[dict[str, Any]]:
    """The Deployment and its Service, as a user would write them (no lmcache settings)."""
    labels = {"app": NAME}
    probe = {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": 2,
        "failureThreshold": 10,
    }
    container = {
        "name": "vllm",
        "image": settings.image("vllm-cpu"),
        "imagePullPolicy": "Never",
        "command": ["vllm", "serve"],
        "args": [
            MODEL_MOUNT, "--served-model-name", SERVED_MODEL, "--host", "0.0.0.0",
            "--port", str(PORT), "--max-model-len", "4096",
            # the node cache, not vLLM's own prefix cache, must serve the second request
            "--no-enable-prefix-caching", "--enforce-eager", "--seed", "0",
        ],
        "env": [
            {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
        ],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "500m", "memory": "6Gi"}, "limits": {"memory": "6Gi"}},
        "volumeMounts": [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}],
        "startupProbe": {**probe, "failureThreshold": 300},
        "readinessProbe": probe,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }  # fmt: skip
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": settings.cache_namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                # the one lmcache setting: which LMCacheCluster the webhook wires it to
                "metadata": {"labels": {**labels, "lmcache.dev/cluster": cluster}},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": settings.node},
                    "enableServiceLinks": False,  # a Service "vllm" would set VLLM_PORT
                    "containers": [container],
                    "volumes": [
                        {"name": "model", "hostPath": {"path": model_dir, "type": "Directory"}}
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": NAME, "namespace": settings.cache_namespace},
        "spec": {
            "selector": labels,
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return [deployment, service]


def pods(kube: Kube, settings: Settings) -> list[dict[str, Any]]:
    found = kube.items("pods", settings.cache_namespace, f"app={NAME}")
    for pod in found:
        for status in pod.get("status", {}).get("containerStatuses") or []:
            if status.get("restartCount", 0) > 0:
                last = (status.get("lastState") or {}).get("terminated") or {}
                raise AssertionError(
                    f"the plain vLLM pod restarted: {last.get('reason')} "
                    f"(exit {last.get('exitCode')})\n{str(last.get('message') or '')[-3000:]}"
                )
    return [p for p in found if not p["metadata"].get("deletionTimestamp")]


def ready_pod(kube: Kube, settings: Settings) -> dict[str, Any] | None:
    for pod in pods(kube, settings):
        conditions = pod.get("status", {}).get("conditions") or []
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            return pod
    return None
