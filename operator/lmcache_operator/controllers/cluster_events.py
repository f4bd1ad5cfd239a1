"""Watch events of what an LMCacheCluster's status is computed from: DaemonSets, pods, nodes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lmcache_operator.builders.cache_rollout import TEMPLATE_HASH_ANNOTATION
from lmcache_operator.builders.common import CLUSTER_LABEL, MANAGED_BY
from lmcache_operator.builders.lmcachecluster import APP_NAME
from lmcache_operator.podfailures import container_failures
from lmcache_operator.quantity import parse_bytes
from lmcache_operator.state import Key, Views, forget_unseen, owner_key

DAEMONSET_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY},app.kubernetes.io/name={APP_NAME}"
POD_SELECTOR = f"app.kubernetes.io/name={APP_NAME},{CLUSTER_LABEL}"


def pod_summary(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    status = body.get("status", {})
    return {
        "metadata": {
            "name": meta["name"],
            "uid": meta.get("uid", ""),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "templateHash": (meta.get("annotations") or {}).get(TEMPLATE_HASH_ANNOTATION, ""),
        },
        "spec": {
            "nodeName": body.get("spec", {}).get("nodeName"),
            "hostNetwork": bool(body.get("spec", {}).get("hostNetwork")),
        },
        "status": {
            "phase": status.get("phase"),
            "hostIP": status.get("hostIP", ""),
            "podIP": status.get("podIP", ""),
            "conditions": status.get("conditions") or [],
            "containerStatuses": [
                {"restartCount": s.get("restartCount", 0)}
                for s in status.get("containerStatuses") or []
            ],
        },
        "failures": container_failures(status),
    }


class ClusterObserver:
    """Keeps the cluster views from watch events; asks for a status refresh when they move."""

    def __init__(self, views: Views, refresh: Callable[[Key], None]) -> None:
        self.views = views
        self.refresh = refresh

    def on_daemonset(self, event: str, obj: dict[str, Any]) -> None:
        if event == "SYNCED":
            return
        key = owner_key(obj, CLUSTER_LABEL)
        if key is None:
            return
        view = self.views.cluster(key)
        view.daemonset = None if event == "DELETED" else obj
        self.views.prune_cluster(key)
        self.refresh(key)

    def on_pod(self, event: str, obj: dict[str, Any]) -> None:
        if event == "SYNCED":  # after a (re)list: forget pods deleted while we were not watching
            pods = ((k, v.pods) for k, v in self.views.clusters.items())
            for changed in forget_unseen(pods, obj):
                self.refresh(changed)
            return
        key = owner_key(obj, CLUSTER_LABEL)
        if key is None:
            return
        view = self.views.cluster(key)
        name = obj["metadata"]["name"]
        if event == "DELETED":
            view.pods.pop(name, None)
            self.views.prune_cluster(key)
        else:
            view.pods[name] = pod_summary(obj)
        self.refresh(key)

    def on_node(self, event: str, obj: dict[str, Any]) -> None:
        """A node that goes away or stops being Ready makes its cache endpoint not ready."""
        problems = self.views.node_problems
        if event == "SYNCED":
            seen_nodes = {name for _, name in obj["seen"]}
            for name in [n for n in problems if n not in seen_nodes]:
                problems[name] = "deleted"
            for name in [n for n in self.views.node_memory if n not in seen_nodes]:
                del self.views.node_memory[name]
            return
        name = obj["metadata"]["name"]
        memory_before = self.views.node_memory.get(name)
        if event == "DELETED":
            self.views.node_memory.pop(name, None)
        else:
            allocatable = (obj.get("status") or {}).get("allocatable") or {}
            try:
                self.views.node_memory[name] = parse_bytes(str(allocatable["memory"]))
            except (KeyError, ValueError):
                self.views.node_memory.pop(name, None)
        problem: str | None = None
        if event == "DELETED":
            problem = "deleted"
        else:
            for condition in obj.get("status", {}).get("conditions") or []:
                if condition.get("type") == "Ready" and condition.get("status") != "True":
                    problem = "NotReady"
        if problems.get(name) == problem and memory_before == self.views.node_memory.get(name):
            return
        if problem is None:
            problems.pop(name, None)
        else:
            problems[name] = problem
        for key, view in list(self.views.clusters.items()):
            if any(p["spec"].get("nodeName") == name for p in view.pods.values()):
                self.refresh(key)
