"""REST paths of the kinds the operator touches (the client is generic over them)."""

from __future__ import annotations

PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "Secret": "secrets",
    "Pod": "pods",
    "Namespace": "namespaces",
    "Node": "nodes",
    "Event": "events",
    "Lease": "leases",
    "DaemonSet": "daemonsets",
    "Deployment": "deployments",
    "Job": "jobs",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "ServiceMonitor": "servicemonitors",
    "CustomResourceDefinition": "customresourcedefinitions",
    "LMCacheCluster": "lmcacheclusters",
    "VLLMDeployment": "vllmdeployments",
}
CLUSTER_SCOPED = frozenset({"Namespace", "Node", "CustomResourceDefinition"})


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    """The REST path of a collection or an object."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    plural = PLURALS[kind]
    if kind not in CLUSTER_SCOPED and namespace:
        base += f"/namespaces/{namespace}"
    path = f"{base}/{plural}"
    return f"{path}/{name}" if name else path


def resource_of(path: str) -> str:
    """The resource (and subresource) a REST path names, e.g. lmcacheclusters/status."""
    parts = [p for p in path.split("?", maxsplit=1)[0].split("/") if p]
    for index in range(len(parts) - 1, -1, -1):
        if parts[index] in PLURALS.values():
            return "/".join(parts[index : index + 1] + parts[index + 2 : index + 3])
    return path
