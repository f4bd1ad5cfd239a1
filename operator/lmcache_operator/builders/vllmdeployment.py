"""Objects of a VLLMDeployment: the vLLM Deployment and the Service of its OpenAI API."""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from lmcache_operator.api.policy import SHM, PodPolicy
from lmcache_operator.api.vllmdeployment import VLLMDeploymentSpec
from lmcache_operator.builders import model_cache
from lmcache_operator.builders.common import (
    CONFIG_HASH_ANNOTATION,
    content_hash,
    standard_labels,
)
from lmcache_operator.builders.credentials import (
    CLIENT_KEY_ANNOTATION,
    SERVER_KEY_ANNOTATION,
    client_volume,
)
from lmcache_operator.builders.podsecurity import (
    RUNTIME_DEFAULT_SECCOMP,
    confine_host_paths,
    merged_context,
    restricted_container_context,
)
from lmcache_operator.builders.vllm_connector import (
    CONNECTOR_DIR,
    CONNECTOR_VOLUME,
    SCHEDULING_GATE,
    CacheConnection,
    cache_pod_affinity_term,
    connector_env,
    host_ip_env,
    install_connector_container,
    kv_transfer_args,
    wait_for_cache_container,
)

APP_NAME = "vllm"
COMPONENT = "engine"
CONTAINER_NAME = "vllm"
DEPLOYMENT_LABEL = "lmcache.dev/vllm-deployment"
CACHE_CLUSTER_LABEL = "lmcache.dev/cache-cluster"
KV_ROLE_LABEL = "lmcache.dev/kv-role"
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def selector_labels(name: str) -> dict[str, str]:
    """Immutable Deployment selector; also the status' selector for the scale subresource."""
    return {"app.kubernetes.io/name": APP_NAME, DEPLOYMENT_LABEL: name}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def labels(name: str) -> dict[str, str]:
    return {**standard_labels(name, APP_NAME, COMPONENT), DEPLOYMENT_LABEL: name}


def name_problems(name: str) -> list[str]:
    if len(name) > 63 or not _NAME_RE.match(name):
        return [
            f"metadata.name {name!r} must be a DNS-1035 label (at most 63 characters, lower case "
            "letters, digits and '-', starting with a letter): it names the Service"
        ]
    return []


def service_url(name: str, namespace: str, spec: VLLMDeploymentSpec) -> str:
    return f"http://{name}.{namespace}.svc:{spec.service.port}/v1"


def _engine_args(spec: VLLMDeploymentSpec, conn: CacheConnection | None) -> list[str]:
    engine = spec.engine
    args = [spec.model.name, "--host", "0.0.0.0", "--port", str(spec.service.port)]  # noqa: S104
    if spec.model.served_model_name:
        args += ["--served-model-name", spec.model.served_model_name]
    args += ["--tensor-parallel-size", str(spec.parallelism.tensor)]
    args += ["--pipeline-parallel-size", str(spec.parallelism.pipeline)]
    if engine.gpu_memory_utilization is not None and spec.device == "cuda":
        args += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    if engine.max_model_len is not None:
        args += ["--max-model-len", str(engine.max_model_len)]
    if engine.enable_prefix_caching is not None:
        args.append(
            "--enable-prefix-caching"
            if engine.enable_prefix_caching
            else "--no-enable-prefix-caching"
        )
    if conn is not None:
        args += kv_transfer_args(spec, conn)
    return args + list(engine.extra_args)


def _user_env(spec: VLLMDeploymentSpec) -> list[dict[str, Any]]:
    return [dict(item) for item in (*spec.engine.env, *spec.pod.env)]


def container_env(
    spec: VLLMDeploymentSpec, conn: CacheConnection | None, *, install: bool
) -> list[dict[str, Any]]:
    """HOST_IP first (the others reference it), ours unless the user set the name, then theirs."""
    user = _user_env(spec)
    user_names = {str(item.get("name")) for item in user}
    ours: list[dict[str, Any]] = [host_ip_env(), {"name": "PYTHONHASHSEED", "value": "0"}]
    if conn is not None:
        ours += connector_env(conn, install=install)
    token = spec.model.hf_token_secret_ref
    if token is not None:
        ours.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}},
            }
        )
    ours += model_cache.env(spec)
    if install and "PYTHONPATH" in user_names:  # keep theirs, after the connector's directory
        for item in user:
            if item.get("name") == "PYTHONPATH" and "value" in item:
                item["value"] = f"{CONNECTOR_DIR}:{item['value']}"
    return [e for e in ours if e["name"] not in user_names] + user


def container_resources(spec: VLLMDeploymentSpec) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if spec.gpus:
        limits[spec.resources.gpu_resource_name] = str(spec.gpus)
    if spec.resources.cpu is not None:
        requests["cpu"] = spec.resources.cpu
    if spec.resources.memory is not None:
        requests["memory"] = limits["memory"] = spec.resources.memory
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _probes(spec: VLLMDeploymentSpec) -> dict[str, Any]:
    probes = spec.probes
    if not probes.enabled:
        return {}

    def probe(failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": probes.period_seconds,
            "timeoutSeconds": 5,
            "failureThreshold": failures,
        }

    startup_failures = max(1, math.ceil(probes.startup_timeout_seconds / probes.period_seconds))
    return {
        "startupProbe": probe(startup_failures),
        "readinessProbe": probe(probes.failure_threshold),
        "livenessProbe": probe(probes.failure_threshold),
    }


def _volumes(
    name: str, spec: VLLMDeploymentSpec, conn: CacheConnection | None, *, install: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    shm_path = conn.host_shm_path if conn is not None else SHM
    volumes: list[dict[str, Any]] = [
        {"name": "shm", "hostPath": {"path": shm_path, "type": "Directory"}}
    ]
    mounts: list[dict[str, Any]] = [{"name": "shm", "mountPath": SHM}]
    if conn is not None:  # the cluster's client keys (LMCACHE_NODE_CREDENTIALS_DIR)
        volume, mount = client_volume(conn.cluster)
        volumes.append(volume)
        mounts.append(mount)
    if install:
        volumes.append({"name": CONNECTOR_VOLUME, "emptyDir": {}})
        mounts.append({"name": CONNECTOR_VOLUME, "mountPath": CONNECTOR_DIR, "readOnly": True})
    model_volume = spec.model.volume
    if model_volume is not None:
        volumes.append({"name": "model", **copy.deepcopy(model_volume.source)})
        mounts.append({"name": "model", "mountPath": model_volume.mount_path, "readOnly": True})
    cache_volume = model_cache.volume_and_mount(name, spec)
    if cache_volume is not None:
        volumes.append(cache_volume[0])
        mounts.append(cache_volume[1])
    volumes += [dict(v) for v in spec.pod.volumes]
    mounts += [dict(m) for m in spec.pod.volume_mounts]
    return volumes, mounts


def _match_expressions(selector: dict[str, str]) -> list[dict[str, Any]]:
    return [{"key": k, "operator": "In", "values": [v]} for k, v in sorted(selector.items())]


def placement(spec: VLLMDeploymentSpec, conn: CacheConnection | None) -> dict[str, Any]:
    """nodeSelector, affinity and schedulingGates for the colocation mode."""
    user = spec.placement
    affinity: dict[str, Any] = copy.deepcopy(user.affinity) if user.affinity else {}
    node_selector = dict(user.node_selector)
    gates: list[dict[str, str]] = []
    mode = user.colocate_with_cache if conn is not None else "None"
    if conn is not None and mode == "Required":
        node_selector = {**conn.node_selector, **node_selector}
        pod_affinity = affinity.setdefault("podAffinity", {})
        pod_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", []).append(
            cache_pod_affinity_term(conn)
        )
        gates.append({"name": SCHEDULING_GATE})  # lifted by the operator: ready nodes only
    elif conn is not None and mode == "Preferred":
        if conn.node_selector:
            node_affinity = affinity.setdefault("nodeAffinity", {})
            node_affinity.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append(
                {
                    "weight": 100,
                    "preference": {
                        "matchExpressions": _match_expressions(dict(conn.node_selector))
                    },
                }
            )
        pod_affinity = affinity.setdefault("podAffinity", {})
        pod_affinity.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append(
            {"weight": 100, "podAffinityTerm": cache_pod_affinity_term(conn)}
        )
    out: dict[str, Any] = {}
    if node_selector:
        out["nodeSelector"] = node_selector
    if affinity:
        out["affinity"] = affinity
    if gates:
        out["schedulingGates"] = gates
    return out


def pod_security_context(spec: VLLMDeploymentSpec, conn: CacheConnection | None) -> dict[str, Any]:
    """seccomp RuntimeDefault, the cache cluster's shm group (also fsGroup: a non-root vLLM,
    such as our CPU image, reads the 0440 client keys through it), runAsNonRoot for our CPU
    image (stock vLLM images run as root: opt in with pod.securityContext.runAsUser)."""
    defaults: dict[str, Any] = {"seccompProfile": dict(RUNTIME_DEFAULT_SECCOMP)}
    if spec.image_runs_as_non_root:
        defaults["runAsNonRoot"] = True
    if conn is not None and conn.shm_group is not None:
        defaults["supplementalGroups"] = [conn.shm_group]
        defaults["fsGroup"] = conn.shm_group
    return merged_context(defaults, spec.pod.security_context)


def container_security_context(spec: VLLMDeploymentSpec) -> dict[str, Any]:
    """No privilege escalation, every capability dropped; the spec's merged over."""
    return merged_context(restricted_container_context(), spec.pod.container_security_context)


def build_deployment(
    name: str,
    namespace: str,
    spec: VLLMDeploymentSpec,
    conn: CacheConnection | None,
    policy: PodPolicy | None = None,
) -> dict[str, Any]:
    """The vLLM Deployment; ``conn`` is None when the cache is disabled. Host paths are
    confined to ``policy``'s prefixes (default: the chart's); validate with
    ``spec.semantic_problems(policy)`` first."""
    install = conn is not None and not spec.image_includes_connector
    volumes, mounts = _volumes(name, spec, conn, install=install)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image_reference,
        "imagePullPolicy": spec.image.pull_policy,
        "command": ["vllm", "serve"],
        "args": _engine_args(spec, conn),
        "terminationMessagePolicy": "FallbackToLogsOnError",  # quoted by ReplicaFailure
        "ports": [{"name": "http", "containerPort": spec.service.port, "protocol": "TCP"}],
        "env": container_env(spec, conn, install=install),
        "volumeMounts": mounts,
        "securityContext": container_security_context(spec),
        **_probes(spec),
    }
    resources = container_resources(spec)
    if resources:
        container["resources"] = resources
    if spec.pod.env_from:
        container["envFrom"] = [dict(source) for source in spec.pod.env_from]
    init: list[dict[str, Any]] = []
    if install and conn is not None:
        init.append(install_connector_container(conn))
    if conn is not None and spec.placement.colocate_with_cache == "Required":
        init.append(wait_for_cache_container(conn))
    pod_labels = {**spec.pod.labels, **labels(name)}
    annotations = dict(spec.pod.annotations)
    if conn is not None:
        pod_labels[CACHE_CLUSTER_LABEL] = conn.cluster
        pod_labels[KV_ROLE_LABEL] = spec.cache.kv_role
        annotations[CONFIG_HASH_ANNOTATION] = conn.settings_hash()
        if conn.client_key:  # a rotation or new keys roll the pods (the connector reads
            annotations[CLIENT_KEY_ANNOTATION] = conn.client_key  # its keys at start)
            annotations[SERVER_KEY_ANNOTATION] = conn.server_key
    user = spec.placement
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": pod_security_context(spec, conn),
        # Kubernetes would set VLLM_PORT=tcp://... for a Service named "vllm" (and
        # VLLM_*_PORT for "vllm-*"), which vLLM reads as its own setting and dies on
        "enableServiceLinks": False,
        **placement(spec, conn),
    }
    optional: dict[str, Any] = {
        "initContainers": init or None,
        "tolerations": [dict(t) for t in user.tolerations] or None,
        "topologySpreadConstraints": [dict(t) for t in user.topology_spread_constraints] or None,
        "priorityClassName": user.priority_class_name,
        "runtimeClassName": user.runtime_class_name,
        "imagePullSecrets": [
            {"name": s}
            for s in dict.fromkeys(
                [*spec.image.pull_secrets, *(conn.pull_secrets if install and conn else ())]
            )
        ]
        or None,
    }
    pod_spec.update({k: v for k, v in optional.items() if v is not None})
    confine_host_paths(pod_spec, PodPolicy() if policy is None else policy)
    strategy: dict[str, Any] = {"type": spec.strategy.type}
    if spec.strategy.type == "RollingUpdate":
        rolling = {
            key: value
            for key, value in (
                ("maxSurge", spec.strategy.max_surge),
                ("maxUnavailable", spec.strategy.max_unavailable),
            )
            if value is not None
        }
        if rolling:
            strategy["rollingUpdate"] = rolling
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(name)},
            "strategy": strategy,
            "progressDeadlineSeconds": max(600, spec.probes.startup_timeout_seconds + 300),
            "template": {
                "metadata": {"labels": pod_labels, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def build_service(name: str, namespace: str, spec: VLLMDeploymentSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {
            "type": spec.service.type,
            "selector": selector_labels(name),
            "ports": [
                {"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def build_children(
    name: str,
    namespace: str,
    spec: VLLMDeploymentSpec,
    conn: CacheConnection | None,
    policy: PodPolicy | None = None,
) -> list[dict[str, Any]]:
    """Model cache PVC (with model.cache.size), Service and Deployment, in apply order
    (``policy``: see build_deployment)."""
    pvc = model_cache.build_pvc(name, namespace, spec, labels(name))
    return [
        *([pvc] if pvc is not None else []),
        build_service(name, namespace, spec),
        build_deployment(name, namespace, spec, conn, policy),
    ]


def template_hash(deployment: dict[str, Any]) -> str:
    """A hash of the pod template (tests and logs: did a change roll the pods?)."""
    return content_hash(deployment["spec"]["template"])
