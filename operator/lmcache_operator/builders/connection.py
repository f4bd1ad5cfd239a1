"""The connection contract of an LMCacheCluster: what any vLLM pod needs to use its cache.

For every LMCacheCluster the operator keeps a ConfigMap ``<cluster>-connection`` (same
namespace); ``lmcache-operator connection -f`` prints the same offline. It holds the settings
as scalars (port, chunk size, shm paths, the client-credential Secret, ...) and, built from
them, the ``--kv-transfer-config`` JSON, the container env, a strategic-merge patch for a pod
template (``kubectl patch deployment NAME --patch-file``) and a values fragment for vLLM
production-stack's Helm chart. The admission webhook rebuilds the same wiring from the
scalars (:meth:`Connection.from_data`), so a pod wired by the webhook and one patched by hand
get the same env, volumes and scheduling.

The connector reads its server address, port, chunk size, transfer mode and credentials from
``LMCACHE_NODE_*`` / ``LMCACHE_CHUNK_SIZE`` env (``HOST_IP`` from the downward API), so the
``--kv-transfer-config`` JSON names only the connector: it works unchanged in a shell command,
a Helm value or a launcher.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.api.policy import SHM
from lmcache_operator.builders import node_image
from lmcache_operator.builders.cache_security import shm_dir
from lmcache_operator.builders.common import CLUSTER_LABEL, content_hash, standard_labels
from lmcache_operator.builders.credentials import (  # the names the trust model fixes
    CLIENT_CREDENTIALS_VOLUME,
    CLIENT_DIR,
    SECRET_FILE_MODE,
    client_secret_name,
)
from lmcache_operator.builders.lmcachecluster import effective_device
from lmcache_operator.builders.node_image import NodeImageDefaults
from lmcache_operator.builders.vllm_connector import (
    CONNECTOR_CLASS,
    CONNECTOR_DIR,
    CONNECTOR_MODULE,
    CONNECTOR_VOLUME,
    CacheConnection,
    connector_env,
    host_ip_env,
    install_connector_container,
)

CONTRACT_VERSION = "1"
CONNECTION_ANNOTATION = "lmcache.dev/connection"  # on wired pod templates: the contract's hash
SHM_VOLUME = "lmcache-shm"
DEFAULT_CONTAINER = "vllm"
COMPONENT = "connection"
APP_NAME = "lmcache-node"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the documents, the init container's script) as ``|`` blocks."""


def _block_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _block_str)


def dump_yaml(*documents: Any) -> str:
    """YAML a person reads (keys in order, multi-line strings as blocks)."""
    if len(documents) == 1:
        return yaml.dump(documents[0], Dumper=_Dumper, sort_keys=False)
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False)


def connection_configmap_name(cluster: str) -> str:
    return f"{cluster}-connection"


def pod_label(cluster: str) -> str:
    """The label that asks the webhook to wire a pod (on the pod template or the namespace)."""
    return f"{CLUSTER_LABEL}={cluster}"


@dataclass(frozen=True)
class Connection:
    """What a vLLM pod needs to know about LMCacheCluster ``namespace/cluster``."""

    cluster: str
    namespace: str
    port: int
    http_port: int
    chunk_size: int
    transfer_mode: str
    device: str
    host_network: bool
    shm_host_path: str
    shm_dir: str
    shm_group: int
    connector_image: str
    connector_image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_cluster(
        cls,
        name: str,
        namespace: str,
        spec: LMCacheClusterSpec,
        images: NodeImageDefaults = node_image.DEFAULTS,
    ) -> Connection:
        cache = CacheConnection.from_cluster(name, spec, namespace=namespace, images=images)
        return cls(
            cluster=name,
            namespace=namespace,
            port=spec.server.port,
            http_port=spec.server.http_port,
            chunk_size=spec.server.chunk_size,
            transfer_mode=spec.server.transfer_mode,
            device=effective_device(spec),
            host_network=spec.host_network,
            shm_host_path=spec.host_shm_path,
            shm_dir=shm_dir(namespace, name),
            shm_group=spec.group(namespace, name),
            connector_image=cache.image,
            connector_image_pull_policy=spec.image.pull_policy,
            image_pull_secrets=tuple(spec.image.pull_secrets),
            node_selector=dict(spec.placement.node_selector),
        )

    @property
    def client_secret(self) -> str:
        return client_secret_name(self.cluster)

    @property
    def configmap_name(self) -> str:
        return connection_configmap_name(self.cluster)

    def cache_connection(self) -> CacheConnection:
        """The same settings in the form the VLLMDeployment builders take."""
        return CacheConnection(
            cluster=self.cluster,
            port=self.port,
            http_port=self.http_port,
            chunk_size=self.chunk_size,
            transfer_mode=self.transfer_mode,
            device=self.device,
            host_network=self.host_network,
            host_shm_path=self.shm_host_path,
            shm_group=self.shm_group,
            node_selector=dict(self.node_selector),
            image=self.connector_image,
            pull_policy=self.connector_image_pull_policy,
            pull_secrets=self.image_pull_secrets,
        )

    def settings(self) -> dict[str, str]:
        """The scalar settings, as the ConfigMap stores them (strings)."""
        return {
            "version": CONTRACT_VERSION,
            "cluster": self.cluster,
            "namespace": self.namespace,
            "podLabel": pod_label(self.cluster),
            "port": str(self.port),
            "httpPort": str(self.http_port),
            "chunkSize": str(self.chunk_size),
            "transferMode": self.transfer_mode,
            "device": self.device,
            "hostNetwork": "true" if self.host_network else "false",
            "shmHostPath": self.shm_host_path,
            "shmDir": self.shm_dir,
            "shmGroup": str(self.shm_group),
            "clientSecret": self.client_secret,
            "credentialsDir": CLIENT_DIR,
            "connectorImage": self.connector_image,
            "connectorImagePullPolicy": self.connector_image_pull_policy,
            "imagePullSecrets": json.dumps(list(self.image_pull_secrets)),
            "nodeSelector": json.dumps(dict(sorted(self.node_selector.items()))),
        }

    def digest(self) -> str:
        """Changes with any setting (a pod template annotation: re-patching rolls the pods)."""
        return content_hash(self.settings())

    @classmethod
    def from_data(cls, data: Mapping[str, str]) -> Connection:
        """The settings of a connection ConfigMap's data; ValueError names what is wrong."""
        version = data.get("version")
        if version != CONTRACT_VERSION:
            raise ValueError(
                f"contract version {version!r} is not {CONTRACT_VERSION!r}: the operator that "
                "wrote it is newer or older than this one"
            )
        try:
            return cls(
                cluster=data["cluster"],
                namespace=data["namespace"],
                port=int(data["port"]),
                http_port=int(data["httpPort"]),
                chunk_size=int(data["chunkSize"]),
                transfer_mode=data["transferMode"],
                device=data["device"],
                host_network=data["hostNetwork"] == "true",
                shm_host_path=data["shmHostPath"],
                shm_dir=data["shmDir"],
                shm_group=int(data["shmGroup"]),
                connector_image=data["connectorImage"],
                connector_image_pull_policy=data["connectorImagePullPolicy"],
                image_pull_secrets=tuple(str(s) for s in json.loads(data["imagePullSecrets"])),
                node_selector={str(k): str(v) for k, v in json.loads(data["nodeSelector"]).items()},
            )
        except KeyError as exc:
            raise ValueError(f"key {exc.args[0]!r} is missing") from None
        except (TypeError, AttributeError, ValueError) as exc:  # JSONDecodeError is one
            raise ValueError(f"a value is malformed: {exc}") from None


def kv_transfer_config(kv_role: str = "kv_both") -> dict[str, Any]:
    """vLLM's ``--kv-transfer-config``: our connector; its settings come from the env."""
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": kv_role,
    }


def kv_transfer_json(kv_role: str = "kv_both") -> str:
    return json.dumps(kv_transfer_config(kv_role), separators=(",", ":"))


def kv_transfer_args(kv_role: str = "kv_both") -> list[str]:
    return ["--kv-transfer-config", kv_transfer_json(kv_role)]


def env(conn: Connection, *, install: bool = True) -> list[dict[str, Any]]:
    """The vLLM container's env, in order: ``HOST_IP`` first (the others reference it)."""
    return [
        host_ip_env(),
        {"name": "PYTHONHASHSEED", "value": "0"},
        *connector_env(conn, install=install),
    ]


def volumes(conn: Connection, *, install: bool = True) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": SHM_VOLUME, "hostPath": {"path": conn.shm_host_path, "type": "Directory"}},
        {
            "name": CLIENT_CREDENTIALS_VOLUME,
            "secret": {"secretName": conn.client_secret, "defaultMode": SECRET_FILE_MODE},
        },
    ]
    if install:
        out.append({"name": CONNECTOR_VOLUME, "emptyDir": {}})
    return out


def volume_mounts(*, install: bool = True) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": SHM_VOLUME, "mountPath": SHM},  # the host's: the server maps the same segments
        {"name": CLIENT_CREDENTIALS_VOLUME, "mountPath": CLIENT_DIR, "readOnly": True},
    ]
    if install:
        out.append({"name": CONNECTOR_VOLUME, "mountPath": CONNECTOR_DIR, "readOnly": True})
    return out


def init_containers(conn: Connection, *, install: bool = True) -> list[dict[str, Any]]:
    """Copies the connector from the cache image (for vLLM images without lmcache_node)."""
    return [install_connector_container(conn.cache_connection())] if install else []


def pod_security_context(conn: Connection) -> dict[str, Any]:
    """The cluster's shm group (its directory is 2770) and fsGroup (the 0440 client keys)."""
    return {"supplementalGroups": [conn.shm_group], "fsGroup": conn.shm_group}


def pod_template_patch(
    conn: Connection, *, container: str = DEFAULT_CONTAINER, install: bool = True
) -> dict[str, Any]:
    """A strategic-merge patch of a workload's pod template (Deployment, StatefulSet, ...):
    ``kubectl patch deployment NAME --patch-file patch.yaml``. It merges by name (containers,
    env, volumes) and by mount path (volumeMounts: an existing /dev/shm mount is replaced);
    it cannot add to ``args`` (Kubernetes replaces lists of strings): add
    ``--kv-transfer-config`` (key kvTransferConfig) to the container's command yourself."""
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security_context(conn),
        "volumes": volumes(conn, install=install),
        "containers": [
            {
                "name": container,
                "env": env(conn, install=install),
                "volumeMounts": volume_mounts(install=install),
            }
        ],
    }
    if install:
        pod_spec["initContainers"] = init_containers(conn, install=install)
    if conn.image_pull_secrets and install:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in conn.image_pull_secrets]
    if conn.node_selector:
        pod_spec["nodeSelector"] = dict(conn.node_selector)
    metadata = {
        "labels": {CLUSTER_LABEL: conn.cluster},
        "annotations": {CONNECTION_ANNOTATION: conn.digest()},
    }
    return {"spec": {"template": {"metadata": metadata, "spec": pod_spec}}}


def production_stack_values(conn: Connection, *, install: bool = True) -> str:
    """A fragment of vLLM production-stack's values (``servingEngineSpec.modelSpec[]``)."""
    model: dict[str, Any] = {
        "vllmConfig": {"extraArgs": kv_transfer_args()},
        "env": env(conn, install=install),
        "extraVolumes": volumes(conn, install=install),
        "extraVolumeMounts": volume_mounts(install=install),
    }
    if conn.node_selector:
        model["nodeSelectorTerms"] = [
            {
                "matchExpressions": [
                    {"key": key, "operator": "In", "values": [value]}
                    for key, value in sorted(conn.node_selector.items())
                ]
            }
        ]
    if install:
        init = init_containers(conn)[0]
        model["initContainer"] = {
            "name": init["name"],
            "image": init["image"],
            "command": init["command"],
            "extraVolumeMounts": init["volumeMounts"],
        }
    values = {
        "servingEngineSpec": {
            "securityContext": pod_security_context(conn),
            "modelSpec": [{"name": "<your model entry>", **model}],
        }
    }
    header = (
        f"# vLLM production-stack values wiring a model to LMCacheCluster "
        f"{conn.namespace}/{conn.cluster}.\n"
        "# Merge these keys into your modelSpec entry by hand: Helm replaces lists, so a\n"
        "# second -f file holding modelSpec would replace yours. Without tensorParallelSize\n"
        "# (the chart then mounts its own /dev/shm), and with the release in this namespace.\n"
    )
    return header + dump_yaml(values)


def build_connection_configmap(
    name: str,
    namespace: str,
    spec: LMCacheClusterSpec,
    images: NodeImageDefaults = node_image.DEFAULTS,
) -> dict[str, Any]:
    """``<cluster>-connection``: the settings and everything built from them."""
    conn = Connection.from_cluster(name, namespace, spec, images)
    data = {
        **conn.settings(),
        "kvTransferConfig": kv_transfer_json(),
        "env": dump_yaml(env(conn)),
        "podTemplatePatch": dump_yaml(pod_template_patch(conn)),
        "productionStackValues": production_stack_values(conn),
    }
    labels = {**standard_labels(name, APP_NAME, COMPONENT), CLUSTER_LABEL: name}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": connection_configmap_name(name),
            "namespace": namespace,
            "labels": labels,
        },
        "data": data,
    }
