"""How a vLLM pod reaches its node's cache server: connector config, env, init containers.

The connection settings come from the referenced LMCacheCluster (port, chunk size, transfer
mode, image); the server address is the pod's own node, ``tcp://$(HOST_IP)``, which Kubernetes
expands in ``args`` and ``env`` from the ``HOST_IP`` variable (fieldRef ``status.hostIP``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.api.vllmdeployment import VLLMDeploymentSpec
from lmcache_operator.builders import node_image
from lmcache_operator.builders.cache_security import IMAGE_GID, IMAGE_UID
from lmcache_operator.builders.common import content_hash
from lmcache_operator.builders.credentials import CLIENT_DIR, PublicKeys, fingerprint
from lmcache_operator.builders.lmcachecluster import effective_device, selector_labels
from lmcache_operator.builders.node_image import NodeImageDefaults
from lmcache_operator.builders.podsecurity import restricted_container_context

CONNECTOR_CLASS = "LMCacheNodeConnector"
CONNECTOR_MODULE = "lmcache_node.vllm.connector"
CONNECTOR_DIR = "/opt/lmcache-connector"
CONNECTOR_VOLUME = "lmcache-connector"
HOST_IP_ENV = "HOST_IP"
CREDENTIALS_DIR_ENV = "LMCACHE_NODE_CREDENTIALS_DIR"
SCHEDULING_GATE = "lmcache.dev/cache-ready"
HOSTNAME_LABEL = "kubernetes.io/hostname"
DEFAULT_BLOCK_SIZE = {"cuda": 16, "cpu": 128}  # vLLM's defaults per platform


def _small_resources() -> dict[str, Any]:
    return {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}


def _cache_image_context() -> dict[str, Any]:
    """Init containers from the cache image: its non-root user, nothing else."""
    return {
        "runAsNonRoot": True,
        "runAsUser": IMAGE_UID,
        "runAsGroup": IMAGE_GID,
        "readOnlyRootFilesystem": True,
        **restricted_container_context(),
    }


# Copies the package directory without importing it (find_spec does not run __init__).
INSTALL_SCRIPT = """\
import importlib.util, pathlib, shutil, sys
spec = importlib.util.find_spec("lmcache_node")
if spec is None or spec.origin is None:
    sys.exit("lmcache_node is not installed in this image: use the lmcache-node image")
src = pathlib.Path(spec.origin).parent
dst = pathlib.Path(sys.argv[1]) / "lmcache_node"
shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
print(f"copied {src} -> {dst}", flush=True)
"""

# Waits (never exits non-zero, so never a crash loop) until the node's server is ready.
WAIT_SCRIPT = """\
import sys, time, urllib.request
url, started, said = sys.argv[1], time.monotonic(), -60.0
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                print(f"cache server ready at {url}", flush=True)
                break
    except OSError as exc:
        error = exc
    else:
        error = f"HTTP {response.status}"
    waited = time.monotonic() - started
    if waited - said >= 30:
        print(f"waiting for the node's cache server at {url} ({waited:.0f}s): {error}",
              flush=True)
        said = waited
    time.sleep(2)
"""


@dataclass(frozen=True)
class CacheConnection:
    """What a vLLM pod needs to know about its LMCacheCluster."""

    cluster: str
    port: int
    http_port: int
    chunk_size: int
    transfer_mode: str
    device: str
    host_network: bool
    host_shm_path: str
    shm_group: int | None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    image: str = ""
    pull_policy: str = "IfNotPresent"
    pull_secrets: Sequence[str] = ()
    client_key: str = ""  # fingerprint of the client key the pods run with ("": not yet known)
    server_key: str = ""  # fingerprint of the servers' key

    @classmethod
    def from_cluster(
        cls,
        name: str,
        spec: LMCacheClusterSpec,
        *,
        namespace: str | None = None,
        images: NodeImageDefaults = node_image.DEFAULTS,
        keys: PublicKeys | None = None,
    ) -> CacheConnection:
        """The connection settings of LMCacheCluster ``namespace/name``. The shm group is
        the spec's, else derived from namespace and name; without ``namespace`` (a caller not
        yet passing it) only a spec's explicit group is known, and the vLLM pods get none.
        ``keys`` (from the cluster's status) names the key fingerprints the pods roll with."""
        return cls(
            cluster=name,
            port=spec.server.port,
            http_port=spec.server.http_port,
            chunk_size=spec.server.chunk_size,
            transfer_mode=spec.server.transfer_mode,
            device=effective_device(spec),
            host_network=spec.host_network,
            host_shm_path=spec.host_shm_path,
            shm_group=spec.group(namespace, name) if namespace is not None else spec.shm_group,
            node_selector=dict(spec.placement.node_selector),
            # the connector-copying init container: either variant holds the package, the CPU
            # one is smaller
            image=node_image.resolve(spec, "cpu", images).image.reference,
            pull_policy=spec.image.pull_policy,
            pull_secrets=tuple(spec.image.pull_secrets),
            client_key=keys.consumer_key if keys is not None else "",
            server_key=fingerprint(keys.server_public) if keys is not None else "",
        )

    def settings_hash(self) -> str:
        """Changes when a setting the connector depends on changes (rolls the vLLM pods)."""
        return content_hash(
            {
                "port": self.port,
                "httpPort": self.http_port,
                "chunkSize": self.chunk_size,
                "transferMode": self.transfer_mode,
                "hostShmPath": self.host_shm_path,
                "shmGroup": self.shm_group,
            }
        )


def kv_transfer_config(spec: VLLMDeploymentSpec, conn: CacheConnection) -> dict[str, Any]:
    """The --kv-transfer-config object; the host stays ``$(HOST_IP)`` for Kubernetes to expand."""
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": spec.cache.kv_role,
        "kv_load_failure_policy": spec.cache.load_failure_policy,
        "kv_connector_extra_config": {
            "lmcache.node.host": f"tcp://$({HOST_IP_ENV})",
            "lmcache.node.port": conn.port,
            "lmcache.node.chunk_size": conn.chunk_size,
        },
    }


def kv_transfer_args(spec: VLLMDeploymentSpec, conn: CacheConnection) -> list[str]:
    text = json.dumps(kv_transfer_config(spec, conn), separators=(",", ":"))
    return ["--kv-transfer-config", text]


def host_ip_env() -> dict[str, Any]:
    return {"name": HOST_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}


class ConnectorEndpoint(Protocol):
    """What the connector's env is made of (a CacheConnection, or the connection contract's
    Connection)."""

    @property
    def port(self) -> int: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def transfer_mode(self) -> str: ...


def connector_env(conn: ConnectorEndpoint, *, install: bool) -> list[dict[str, Any]]:
    """The connector's LMCACHE_* variables (after HOST_IP, which they reference)."""
    env: list[dict[str, Any]] = [
        {"name": "LMCACHE_NODE_HOST", "value": f"tcp://$({HOST_IP_ENV})"},
        {"name": "LMCACHE_NODE_PORT", "value": str(conn.port)},
        {"name": "LMCACHE_CHUNK_SIZE", "value": str(conn.chunk_size)},
        {"name": "LMCACHE_NODE_TRANSFER_MODE", "value": conn.transfer_mode},
        {"name": CREDENTIALS_DIR_ENV, "value": CLIENT_DIR},
    ]
    if install:
        env.append({"name": "PYTHONPATH", "value": CONNECTOR_DIR})
    return env


def install_connector_container(conn: CacheConnection) -> dict[str, Any]:
    """Copies lmcache_node from the cache image into the shared volume (stock vLLM images)."""
    return {
        "name": "install-connector",
        "image": conn.image,
        "imagePullPolicy": conn.pull_policy,
        "command": ["python3", "-c", INSTALL_SCRIPT, CONNECTOR_DIR],
        "volumeMounts": [{"name": CONNECTOR_VOLUME, "mountPath": CONNECTOR_DIR}],
        "resources": _small_resources(),
        "securityContext": _cache_image_context(),
    }


def wait_for_cache_container(conn: CacheConnection) -> dict[str, Any]:
    """Holds the pod (Init, not a crash loop) until the node's cache server is ready."""
    return {
        "name": "wait-for-cache",
        "image": conn.image,
        "imagePullPolicy": conn.pull_policy,
        "command": [
            "python3",
            "-c",
            WAIT_SCRIPT,
            f"http://$({HOST_IP_ENV}):{conn.http_port}/readyz",
        ],
        "env": [host_ip_env()],
        "resources": _small_resources(),
        "securityContext": _cache_image_context(),
    }


def cache_pod_affinity_term(conn: CacheConnection) -> dict[str, Any]:
    return {
        "labelSelector": {"matchLabels": selector_labels(conn.cluster)},
        "topologyKey": HOSTNAME_LABEL,
    }


_BLOCK_SIZE_RE = re.compile(r"^--block[-_]size(?:=(\d+))?$")


def block_size(spec: VLLMDeploymentSpec) -> int:
    """vLLM's KV block size: --block-size in extraArgs, else the platform default."""
    args = spec.engine.extra_args
    for index, arg in enumerate(args):
        match = _BLOCK_SIZE_RE.match(arg)
        if match is None:
            continue
        value = match.group(1) or (args[index + 1] if index + 1 < len(args) else "")
        if value.isdigit():
            return int(value)
    return DEFAULT_BLOCK_SIZE[spec.device]


def compatibility_problems(spec: VLLMDeploymentSpec, conn: CacheConnection) -> list[str]:
    """Why the cluster's servers cannot serve these vLLM pods (chunk size, mode, layout)."""
    problems: list[str] = []
    name = f"LMCacheCluster {conn.cluster!r}"
    if not conn.host_network:
        problems.append(
            f"{name} runs without hostNetwork, so vLLM pods cannot reach it at their node's IP: "
            "set hostNetwork: true on the cluster"
        )
    blocks = block_size(spec)
    if conn.chunk_size % blocks:
        problems.append(
            f"{name} uses chunkSize {conn.chunk_size}, which is not a multiple of vLLM's block "
            f"size {blocks} on {spec.device}: set server.chunkSize to a multiple of {blocks} or "
            "pass --block-size in engine.extraArgs"
        )
    if conn.transfer_mode == "shared" and conn.device != spec.device:
        problems.append(
            f"{name} shares KV memory on {conn.device} (transferMode shared) but vLLM runs on "
            f"{spec.device}: set the cluster's device to {spec.device} or use transferMode engine"
        )
    return problems
