"""Objects of a VLLMDeployment's router (spec.router): Deployment, Service, RBAC.

The router (``lmcache-node router``, from the cache cluster's node image by default) finds
the replicas through the EndpointSlices of the VLLMDeployment's Service and the node servers
through those of the cache cluster's Service (joined by node name), so its ServiceAccount
may get, list and watch EndpointSlices in the namespace, nothing else. It reaches the node
servers with the cluster's client credentials (Secret ``<cluster>-client-credentials``), like
the vLLM pods, and loads the model's tokenizer (from the model volume, or the Hub).
"""

from __future__ import annotations

from typing import Any

from lmcache_operator.api.vllmdeployment import VLLMDeploymentSpec
from lmcache_operator.builders.common import standard_labels
from lmcache_operator.builders.lmcachecluster import service_name as cache_service_name
from lmcache_operator.builders.podsecurity import RUNTIME_DEFAULT_SECCOMP
from lmcache_operator.builders.vllm_connector import CacheConnection

APP_NAME = "vllm-router"  # not "vllm": the vLLM Service and Deployment select on that
COMPONENT = "router"
CONTAINER_NAME = "router"
ROUTER_LABEL = "lmcache.dev/router"
PORT_NAME = "http"
CREDENTIALS_DIR = "/var/run/lmcache/client"
CREDENTIALS_ENV = "LMCACHE_NODE_CREDENTIALS_DIR"
SUFFIX = "-router"


def router_name(name: str) -> str:
    return f"{name}{SUFFIX}"


def client_credentials_secret(cluster: str) -> str:
    return f"{cluster}-client-credentials"


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP_NAME, ROUTER_LABEL: name}


def labels(name: str) -> dict[str, str]:
    return {**standard_labels(name, APP_NAME, COMPONENT), ROUTER_LABEL: name}


def name_problems(name: str) -> list[str]:
    if len(router_name(name)) > 63:
        return [
            f"metadata.name {name!r} is too long for a router: the Service {router_name(name)!r} "
            f"must be at most 63 characters (a name of at most {63 - len(SUFFIX)})"
        ]
    return []


def router_url(name: str, namespace: str, spec: VLLMDeploymentSpec) -> str:
    """status.routerUrl."""
    return f"http://{router_name(name)}.{namespace}.svc:{spec.service.port}/v1"


def router_args(name: str, spec: VLLMDeploymentSpec, conn: CacheConnection | None) -> list[str]:
    router = spec.router
    args = [
        "router", "--host", "0.0.0.0", "--port", str(spec.service.port),  # noqa: S104
        "--policy", router.policy, "--service", name, "--port-name", "http",
        "--tokenizer", spec.model.name, "--model-name", spec.model.name,
        "--session-header", router.session_header,
    ]  # fmt: skip
    if conn is not None:
        args += ["--cache-service", cache_service_name(conn.cluster)]
    return args + list(router.extra_args)


def build_service_account(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": labels(name)},
        "automountServiceAccountToken": True,
    }


def build_role(name: str, namespace: str) -> dict[str, Any]:
    """Read EndpointSlices in the namespace: the replicas' and the node servers'."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": labels(name)},
        "rules": [
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["get", "list", "watch"],
            }
        ],
    }


def build_role_binding(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": labels(name)},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": router_name(name),
        },
        "subjects": [{"kind": "ServiceAccount", "name": router_name(name), "namespace": namespace}],
    }


def build_service(name: str, namespace: str, spec: VLLMDeploymentSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": labels(name)},
        "spec": {
            "type": spec.service.type,
            "selector": selector_labels(name),
            "ports": [
                {
                    "name": PORT_NAME,
                    "port": spec.service.port,
                    "targetPort": PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def _volumes(
    spec: VLLMDeploymentSpec, conn: CacheConnection | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]  # noqa: S108
    if conn is not None:
        secret = {"secretName": client_credentials_secret(conn.cluster), "defaultMode": 0o440}
        volumes.append({"name": "client-credentials", "secret": secret})
        mounts.append({"name": "client-credentials", "mountPath": CREDENTIALS_DIR,
                       "readOnly": True})  # fmt: skip
    model_volume = spec.model.volume
    if model_volume is not None:  # a local tokenizer: the same read-only volume as vLLM's
        volumes.append({"name": "model", **dict(model_volume.source)})
        mounts.append({"name": "model", "mountPath": model_volume.mount_path, "readOnly": True})
    return volumes, mounts


def _env(spec: VLLMDeploymentSpec, conn: CacheConnection | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": "/tmp/hf"},  # noqa: S108 - the emptyDir; Hub downloads
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
    ]
    if conn is not None:
        env.append({"name": CREDENTIALS_ENV, "value": CREDENTIALS_DIR})
    token = spec.model.hf_token_secret_ref
    if token is not None:
        ref = {"secretKeyRef": {"name": token.name, "key": token.key}}
        env.append({"name": "HF_TOKEN", "valueFrom": ref})
    return env


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": PORT_NAME},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }


def build_deployment(
    name: str, namespace: str, spec: VLLMDeploymentSpec, conn: CacheConnection | None
) -> dict[str, Any]:
    """The router Deployment; ``conn`` is None when the cache is disabled (then the router
    routes by load, and spec.router.image is required)."""
    image = spec.router.image or (conn.image if conn is not None else "")
    if not image:
        raise ValueError("spec.router.image is required while cache.enabled is false")
    volumes, mounts = _volumes(spec, conn)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": conn.pull_policy if conn is not None else "IfNotPresent",
        "command": ["lmcache-node"],
        "args": router_args(name, spec, conn),
        "ports": [{"name": PORT_NAME, "containerPort": spec.service.port, "protocol": "TCP"}],
        "env": _env(spec, conn),
        "volumeMounts": mounts,
        "resources": spec.router.resources.requirements(),
        "readinessProbe": _probe("/readyz", 5, 2),
        "livenessProbe": _probe("/healthz", 10, 3),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": router_name(name),
        "containers": [container],
        "volumes": volumes,
        "securityContext": {"seccompProfile": dict(RUNTIME_DEFAULT_SECCOMP), "fsGroup": 65532},
        "enableServiceLinks": False,
        "affinity": {  # router pods on different nodes when they can be
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": selector_labels(name)},
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }
                ]
            }
        },
    }
    if conn is not None and conn.pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in conn.pull_secrets]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": labels(name)},
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": selector_labels(name)},
            "template": {"metadata": {"labels": labels(name)}, "spec": pod_spec},
        },
    }


def build_children(
    name: str, namespace: str, spec: VLLMDeploymentSpec, conn: CacheConnection | None
) -> list[dict[str, Any]]:
    """ServiceAccount, Role, RoleBinding, Service, Deployment, in apply order; none when the
    router is disabled (the controller then deletes any it made before)."""
    if not spec.router.enabled:
        return []
    return [
        build_service_account(name, namespace),
        build_role(name, namespace),
        build_role_binding(name, namespace),
        build_service(name, namespace, spec),
        build_deployment(name, namespace, spec, conn),
    ]
