# Long on purpose: the cache DaemonSet and its config, Service and ConfigMaps in one place,
# so one reading shows every field the operator sets on a cache pod.
"""Objects of an LMCacheCluster: node config, ConfigMap, DaemonSet, Services, ServiceMonitor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from lmcache_operator.api.common import GPU_NODE_LABEL
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.api.policy import SHM, PodPolicy
from lmcache_operator.builders import node_image
from lmcache_operator.builders.cache_memory import container_resources
from lmcache_operator.builders.cache_rollout import (
    TEMPLATE_HASH_ANNOTATION,
    daemonset_update_strategy,
)
from lmcache_operator.builders.cache_security import (
    DISK_MOUNT,
    container_security_context,
    disk_mount,
    disk_owner_init,
    pod_security_context,
    shm_dir,
)
from lmcache_operator.builders.common import (
    CLUSTER_LABEL,
    CONFIG_HASH_ANNOTATION,
    content_hash,
    standard_labels,
)
from lmcache_operator.builders.credentials import (
    SERVER_KEY_ANNOTATION,
    PublicKeys,
    build_keys_configmap,
    cache_volumes,
    fingerprint,
    node_credential_config,
)
from lmcache_operator.builders.node_image import NodeImageDefaults
from lmcache_operator.builders.podsecurity import confine_host_paths
from lmcache_operator.builders.user_config import merge_into
from lmcache_operator.quantity import parse_bytes, to_gib

APP_NAME = "lmcache-node"
COMPONENT = "cache-server"
CONTAINER_NAME = "lmcache-node"
CONFIG_KEY = "config.yaml"
CONFIG_DIR = "/etc/lmcache"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
TMP_SIZE_LIMIT = "256Mi"  # /tmp (HOME): the root filesystem is read-only
REMOTE_URL_ENV = "LMCACHE_REMOTE_URL"
HTTP_HOST_ENV = "LMCACHE_HTTP_HOST"  # not in the config file: it needs the pod's own IP
METRICS_LABEL = "lmcache.dev/metrics"
SERVICE_MONITOR_API = "monitoring.coreos.com/v1"
# The longest suffix below ("-cache-metrics") keeps Service names within 63 characters.
MAX_NAME_LENGTH = 63 - len("-cache-metrics")


def daemonset_name(name: str) -> str:
    return f"{name}-cache"


def configmap_name(name: str) -> str:
    return f"{name}-cache-config"


def service_name(name: str) -> str:
    return f"{name}-cache"


def metrics_service_name(name: str) -> str:
    return f"{name}-cache-metrics"


def selector_labels(name: str) -> dict[str, str]:
    """Immutable DaemonSet selector (also how the operator finds a cluster's pods)."""
    return {"app.kubernetes.io/name": APP_NAME, CLUSTER_LABEL: name}


def labels(name: str) -> dict[str, str]:
    return {**standard_labels(name, APP_NAME, COMPONENT), CLUSTER_LABEL: name}


def name_problems(name: str) -> list[str]:
    if len(name) > MAX_NAME_LENGTH:
        return [
            f"metadata.name {name!r} has {len(name)} characters; at most {MAX_NAME_LENGTH} fit "
            "the names of the Services it creates: choose a shorter name"
        ]
    return []


def effective_device(spec: LMCacheClusterSpec) -> str:
    """cuda or cpu: what the server's ``device`` key gets."""
    if spec.server.transfer_mode == "engine":
        return "cpu"  # vLLM copies into the server's shm pool; the server needs no GPU
    if spec.device != "auto":
        return spec.device
    on_gpu_nodes = spec.placement.node_selector.get(GPU_NODE_LABEL) == "true"
    return "cuda" if on_gpu_nodes else "cpu"


def node_config(
    name: str,
    namespace: str,
    spec: LMCacheClusterSpec,
    user_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The node's config file (``lmcache-node serve --config``): the operator's keys over the
    cluster's own settings (``user_config``: ``spec.config`` over ``spec.configFrom``, checked
    with ``user_config.check_user_config`` first; LMCache keys stay as written, the node maps
    them)."""
    cache = spec.cache
    config: dict[str, Any] = {
        "chunk_size": spec.server.chunk_size,
        "local_cpu": True,
        "max_local_cpu_size": to_gib(parse_bytes(cache.cpu_size)),
        "cache_policy": cache.eviction_policy,
        "host": "0.0.0.0",  # noqa: S104 - vLLM pods reach the server at their node's IP
        "port": spec.server.port,
        "http_port": spec.server.http_port,
        "events_port": spec.server.events_port,
        "max_workers": spec.server.max_workers,
        "device": effective_device(spec),
        "log_level": spec.server.log_level,
        "l1_persistent": cache.persistent,
        "shm_dir": shm_dir(namespace, name),
        "shm_group": spec.group(namespace, name),
        **node_credential_config(name, namespace, remote=cache.remote is not None),
    }
    if cache.disk is not None and cache.disk.size is not None:
        config["local_disk"] = f"file://{DISK_MOUNT}/"
        config["max_local_disk_size"] = to_gib(parse_bytes(cache.disk.size))
    if cache.remote is not None:
        if cache.remote.url is not None:  # the Secret form arrives as LMCACHE_REMOTE_URL
            config["remote_url"] = cache.remote.url
        config["remote_serde"] = cache.remote.serde
    return merge_into(config, user_config or {})


def build_configmap(
    name: str,
    namespace: str,
    spec: LMCacheClusterSpec,
    user_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    text = yaml.safe_dump(node_config(name, namespace, spec, user_config), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": configmap_name(name), "namespace": namespace, "labels": labels(name)},
        "data": {CONFIG_KEY: text},
    }


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _env(spec: LMCacheClusterSpec) -> list[dict[str, Any]]:
    # The HTTP API binds the IP the kubelet probes (the pod IP: the node's IP on the host
    # network) and loopback, never 0.0.0.0: on the host network that would be every address
    # of the node.
    own_ip = "HOST_IP" if spec.host_network else "POD_IP"
    env: list[dict[str, Any]] = [
        {"name": "LMCACHE_CONFIG_FILE", "value": CONFIG_PATH},
        _field_env("NODE_NAME", "spec.nodeName"),
        _field_env("POD_NAME", "metadata.name"),
        _field_env("HOST_IP", "status.hostIP"),
    ]
    if not spec.host_network:
        env.append(_field_env("POD_IP", "status.podIP"))
    env.append({"name": HTTP_HOST_ENV, "value": f"$({own_ip}),127.0.0.1"})
    if effective_device(spec) == "cuda":  # CUDA IPC needs the GPUs visible, not requested
        env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"})
        env.append({"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "compute,utility"})
    remote = spec.cache.remote
    if remote is not None and remote.url_secret_ref is not None:
        ref = remote.url_secret_ref
        env.append(
            {
                "name": REMOTE_URL_ENV,
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    return env + [dict(item) for item in spec.pod.env]


def _volumes(name: str, namespace: str, spec: LMCacheClusterSpec) -> tuple[list[Any], list[Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": configmap_name(name)}},
        {"name": "shm", "hostPath": {"path": spec.host_shm_path, "type": "Directory"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "shm", "mountPath": SHM},  # hostPath, shared with vLLM on purpose
    ]
    credential_volumes, credential_mounts = cache_volumes(name)
    volumes += credential_volumes
    mounts += credential_mounts
    if not any(m.get("mountPath") == "/tmp" for m in spec.pod.volume_mounts):  # noqa: S108
        volumes.append({"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}})
        mounts.append({"name": "tmp", "mountPath": "/tmp"})  # noqa: S108 - an emptyDir
    if spec.cache.disk is not None:
        disk = {"path": spec.cache.disk.path, "type": "DirectoryOrCreate"}
        volumes.append({"name": "disk", "hostPath": disk})
        mounts.append(disk_mount(name, namespace))
    volumes += [dict(v) for v in spec.pod.volumes]
    mounts += [dict(m) for m in spec.pod.volume_mounts]
    return volumes, mounts


def _probe(path: str, port: int, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def build_daemonset(
    name: str,
    namespace: str,
    spec: LMCacheClusterSpec,
    config_hash: str,
    policy: PodPolicy | None = None,
    *,
    images: NodeImageDefaults = node_image.DEFAULTS,
    keys: PublicKeys | None = None,
) -> dict[str, Any]:
    """The cache DaemonSet; ``keys`` (the cluster's public keys, when known) puts the server
    key's fingerprint on the pod template, so a new server key rolls the pods."""
    device = effective_device(spec)
    spec = node_image.resolve(spec, device, images)
    volumes, mounts = _volumes(name, namespace, spec)
    server = spec.server
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image.reference,
        "imagePullPolicy": spec.image.pull_policy,
        "command": ["lmcache-node", "serve", "--config", CONFIG_PATH, *server.extra_args],
        "ports": [
            {"name": "zmq", "containerPort": server.port, "protocol": "TCP"},
            {"name": "http", "containerPort": server.http_port, "protocol": "TCP"},
            *(
                [{"name": "events", "containerPort": server.events_port, "protocol": "TCP"}]
                if server.events_port
                else []
            ),
        ],
        "env": _env(spec),
        "resources": container_resources(spec),
        "securityContext": container_security_context(spec),
        "volumeMounts": mounts,
        "readinessProbe": _probe("/readyz", server.http_port, period=5, failures=2),
        "livenessProbe": _probe("/healthz", server.http_port, period=10, failures=3),
        "startupProbe": _probe("/healthz", server.http_port, period=2, failures=60),
        # a server that exits on a bad config says why in its last log line: this puts it
        # in the pod status, which the LMCacheCluster's Degraded condition quotes
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.pod.env_from:
        container["envFrom"] = [dict(source) for source in spec.pod.env_from]
    pod_labels = {**spec.pod.labels, **labels(name)}
    pod_annotations = {**spec.pod.annotations, CONFIG_HASH_ANNOTATION: config_hash}
    if keys is not None:
        pod_annotations[SERVER_KEY_ANNOTATION] = fingerprint(keys.server_public)
    placement = spec.placement
    pod_spec: dict[str, Any] = {
        "hostNetwork": spec.host_network,
        "dnsPolicy": "ClusterFirstWithHostNet" if spec.host_network else "ClusterFirst",
        "nodeSelector": dict(placement.node_selector),
        "containers": [container],
        "volumes": volumes,
        "securityContext": pod_security_context(name, namespace, spec),
        "terminationGracePeriodSeconds": 30,
        # no <SERVICE>_PORT variables: a Service named lmcache-... would inject LMCACHE_*
        # variables the server reads as configuration
        "enableServiceLinks": False,
    }
    optional: dict[str, Any] = {
        "tolerations": [dict(t) for t in placement.tolerations] or None,
        "affinity": placement.affinity,
        "priorityClassName": placement.priority_class_name,
        "runtimeClassName": node_image.runtime_class(spec, device, images),
        "imagePullSecrets": [{"name": s} for s in spec.image.pull_secrets] or None,
    }
    disk_init = disk_owner_init(name, namespace, spec)
    if disk_init is not None:
        pod_spec["initContainers"] = [disk_init]
    pod_spec.update({key: value for key, value in optional.items() if value is not None})
    confine_host_paths(pod_spec, PodPolicy() if policy is None else policy)
    template: dict[str, Any] = {
        "metadata": {"labels": pod_labels, "annotations": pod_annotations},
        "spec": pod_spec,
    }
    pod_annotations[TEMPLATE_HASH_ANNOTATION] = content_hash(template)
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": daemonset_name(name), "namespace": namespace, "labels": labels(name)},
        "spec": {
            "selector": {"matchLabels": selector_labels(name)},
            "updateStrategy": daemonset_update_strategy(spec),
            "template": template,
        },
    }


def build_node_service(name: str, namespace: str, spec: LMCacheClusterSpec) -> dict[str, Any]:
    """ClusterIP Service that only routes to the cache pod on the caller's node."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(name), "namespace": namespace, "labels": labels(name)},
        "spec": {
            "type": "ClusterIP",
            "internalTrafficPolicy": "Local",
            "selector": selector_labels(name),
            "ports": [
                {"name": "zmq", "port": spec.server.port, "targetPort": "zmq", "protocol": "TCP"},
                {
                    "name": "http",
                    "port": spec.server.http_port,
                    "targetPort": "http",
                    "protocol": "TCP",
                },
            ],
        },
    }


def build_metrics_service(name: str, namespace: str, spec: LMCacheClusterSpec) -> dict[str, Any]:
    """Headless Service listing every cache pod's metrics endpoint."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": metrics_service_name(name),
            "namespace": namespace,
            "labels": {**labels(name), METRICS_LABEL: "true"},
        },
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(name),
            "ports": [
                {
                    "name": "http",
                    "port": spec.server.http_port,
                    "targetPort": "http",
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_service_monitor(name: str, namespace: str, spec: LMCacheClusterSpec) -> dict[str, Any]:
    return {
        "apiVersion": SERVICE_MONITOR_API,
        "kind": "ServiceMonitor",
        "metadata": {
            "name": daemonset_name(name),
            "namespace": namespace,
            "labels": {**spec.monitoring.labels, **labels(name)},
        },
        "spec": {
            "selector": {"matchLabels": {**selector_labels(name), METRICS_LABEL: "true"}},
            "namespaceSelector": {"matchNames": [namespace]},
            "endpoints": [
                {"port": "http", "path": "/metrics", "interval": spec.monitoring.interval}
            ],
        },
    }


def build_children(
    name: str,
    namespace: str,
    spec: LMCacheClusterSpec,
    *,
    service_monitor: bool,
    policy: PodPolicy | None = None,
    images: NodeImageDefaults = node_image.DEFAULTS,
    user_config: Mapping[str, Any] | None = None,
    keys: PublicKeys | None = None,
) -> list[dict[str, Any]]:
    """Every child object, in apply order (ConfigMaps before the pods that mount them).

    ``policy`` is the chart's guard rails (default: the chart's defaults): the host paths of
    the pod are confined to its allowed prefixes. ``images`` fills the image a spec leaves
    unset (the CUDA variant and the nvidia RuntimeClass where the cluster serves CUDA).
    ``user_config`` is the cluster's own settings (``spec.config`` over ``spec.configFrom``),
    merged under the operator's keys. ``keys``: the cluster's public keys (the operator's, once
    its Secrets exist): the ConfigMap of allowed client keys, which is not part of the config
    hash (the servers re-read it). ``render`` has none: the Secrets and keys are made at run
    time. Validate with ``spec.semantic_problems(policy)`` and
    ``user_config.check_user_config`` first.
    """
    configmap = build_configmap(name, namespace, spec, user_config)
    config_hash = content_hash({"data": configmap["data"], "env": _env(spec)})
    children = [configmap]
    if keys is not None:
        children.append(build_keys_configmap(name, namespace, keys.server_public, keys.allowed))
    children += [
        build_node_service(name, namespace, spec),
        build_metrics_service(name, namespace, spec),
        build_daemonset(name, namespace, spec, config_hash, policy, images=images, keys=keys),
    ]
    if service_monitor and spec.monitoring.service_monitor:
        children.append(build_service_monitor(name, namespace, spec))
    return children
