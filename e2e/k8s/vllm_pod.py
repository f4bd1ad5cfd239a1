"""A vLLM Deployment (lmcache-vllm-cpu image) wired to its node's cache server by hand.

Until the VLLMDeployment kind exists this is the wiring users write themselves (docs): the
node's IP from the downward API, the connector pointed at tcp://$(HOST_IP):<port>, the
host's /dev/shm, PYTHONHASHSEED=0; the model comes from a hostPath on the node.
"""

from __future__ import annotations

import json
from typing import Any

from e2e.k8s.conftest import Settings

NAME = "vllm"
PORT = 8000
CHUNK = 256  # the LMCacheCluster's server.chunkSize (default)


def kv_transfer_config(zmq_port: int) -> str:
    return json.dumps(
        {
            "kv_connector": "LMCacheNodeConnector",
            "kv_connector_module_path": "lmcache_node.vllm.connector",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {
                # Kubernetes expands $(HOST_IP) in args: no shell wrapper needed
                "lmcache.node.host": "tcp://$(HOST_IP)",
                "lmcache.node.port": zmq_port,
                "lmcache.node.chunk_size": CHUNK,
            },
        }
    )


def build_deployment(settings: Settings, model_dir: str, zmq_port: int) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": "lmcache-e2e"}
    args = [
        "--model", "/models/model", "--served-model-name", "model",
        "--host", "0.0.0.0", "--port", str(PORT),
        "--enforce-eager", "--no-enable-prefix-caching",
        "--max-model-len", "4096", "--seed", "0",
        "--kv-transfer-config", kv_transfer_config(zmq_port),
    ]  # fmt: skip
    env = [
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "PYTHONHASHSEED", "value": "0"},
        {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
    ]
    container = {
        "name": "vllm",
        "image": settings.image("vllm-cpu"),
        "imagePullPolicy": "Never",
        "args": args,
        "env": env,
        "ports": [{"name": "http", "containerPort": PORT}],
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": PORT},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "volumeMounts": [
            {"name": "model", "mountPath": "/models/model", "readOnly": True},
            # the host's tmpfs: the cache server maps the KV tensors vLLM shares there
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {"allowPrivilegeEscalation": False},
        # 1 GiB of KV cache (VLLM_CPU_KVCACHE_SPACE) + the engine's processes
        "resources": {"requests": {"cpu": "500m", "memory": "3Gi"}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": settings.cache_namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": settings.node},
                    "containers": [container],
                    "volumes": [
                        {"name": "model", "hostPath": {"path": model_dir, "type": "Directory"}},
                        {"name": "shm", "hostPath": {"path": "/dev/shm", "type": "Directory"}},
                    ],
                },
            },
        },
    }
