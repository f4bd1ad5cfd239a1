"""What the operator has seen through its watches: one ``Views`` object, owned by the runtime.

Watch events (the resources, their DaemonSets, Deployments and pods, the nodes) update these
maps; controllers compute status and placement from them. Nothing here is module-global:
the runtime makes one ``Views`` and hands it to each controller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lmcache_operator.builders.credentials import KeyState, PublicKeys

Key = tuple[str, str]  # (namespace, name of the owning resource)


def owner_key(obj: Mapping[str, Any], label: str) -> Key | None:
    """(namespace, owner) of a child object from its owner label; None when it has none."""
    meta = obj["metadata"]
    owner = (meta.get("labels") or {}).get(label)
    return (meta["namespace"], owner) if owner else None


def forget_unseen(
    pods_by_key: Iterable[tuple[Key, dict[str, Any]]], synced: Mapping[str, Any]
) -> list[Key]:
    """After a (re)list (a watch's SYNCED event): drop the pods deleted while the watch was
    down from each owner's pod map; the owners whose maps changed."""
    seen, namespace = synced["seen"], synced["namespace"]
    changed = []
    for key, pods in pods_by_key:
        if namespace is not None and key[0] != namespace:
            continue
        gone = [name for name in pods if (key[0], name) not in seen]
        for name in gone:
            del pods[name]
        if gone:
            changed.append(key)
    return changed


def recorded_status(
    body: Mapping[str, Any] | None, last_written: dict[str, Any] | None
) -> dict[str, Any]:
    """The status as last written: this process's own last write when there is one, which
    is newer than a watch event that has not caught up with it yet (kopf hands an object's
    events over behind its handlers), else the object's."""
    return last_written or dict((body or {}).get("status") or {})


@dataclass
class Applied:
    """The result of the last successful reconcile of a cluster (memory only)."""

    generation: int
    daemonset_generation: int
    monitoring_condition: dict[str, str] | None = None
    problems: list[str] = field(default_factory=list)
    forbidden: str | None = None  # RBAC refused the last apply (retried; not a spec problem)


@dataclass
class ClusterView:
    body: dict[str, Any] | None = None
    daemonset: dict[str, Any] | None = None
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    applied: Applied | None = None
    last_written: dict[str, Any] | None = None
    defer_until: float | None = None  # loop time before which same-phase writes wait
    credentials: KeyState | None = None  # the public side of its Secrets (also in status)

    def recorded_status(self) -> dict[str, Any]:
        return recorded_status(self.body, self.last_written)


@dataclass
class VLLMApplied:
    """The last successful reconcile of a VLLMDeployment (memory only)."""

    generation: int | None
    deployment_generation: int = 0
    problems: list[str] = field(default_factory=list)
    forbidden: str = ""  # RBAC refused the last apply (retried; not a spec problem)


@dataclass
class VLLMView:
    body: dict[str, Any] | None = None
    deployment: dict[str, Any] | None = None
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    applied: VLLMApplied | None = None
    last_written: dict[str, Any] | None = None

    def recorded_status(self) -> dict[str, Any]:
        return recorded_status(self.body, self.last_written)


@dataclass
class CacheView:
    """What a consumer needs to know about one LMCacheCluster."""

    body: dict[str, Any] | None = None
    generation: int | None = None
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    ready_nodes: frozenset[str] = frozenset()
    keys: PublicKeys | None = None  # from its status.credentials: the pods' key annotations


def cluster_ref(body: Mapping[str, Any] | None) -> str | None:
    """The LMCacheCluster a VLLMDeployment uses (None: cache disabled or unset)."""
    cache = ((body or {}).get("spec") or {}).get("cache") or {}
    if cache.get("enabled", True) is False:
        return None
    ref = (cache.get("clusterRef") or {}).get("name")
    return str(ref) if ref else None


@dataclass
class Views:
    """Everything the watches told: per LMCacheCluster, per VLLMDeployment, per node."""

    clusters: dict[Key, ClusterView] = field(default_factory=dict)
    node_problems: dict[str, str] = field(default_factory=dict)  # node -> NotReady/deleted
    node_memory: dict[str, int] = field(default_factory=dict)  # node -> allocatable bytes
    vllm: dict[Key, VLLMView] = field(default_factory=dict)
    caches: dict[Key, CacheView] = field(default_factory=dict)  # LMCacheClusters, for consumers

    def cluster(self, key: Key) -> ClusterView:
        return self.clusters.setdefault(key, ClusterView())

    def prune_cluster(self, key: Key) -> None:
        """Drop a view that holds nothing (its cluster and children are gone)."""
        view = self.clusters.get(key)
        if view is not None and view.body is None and view.daemonset is None and not view.pods:
            del self.clusters[key]

    def prune_vllm(self, key: Key) -> None:
        """Drop the view of a deleted VLLMDeployment once its last child event has passed."""
        view = self.vllm.get(key)
        if view is not None and view.body is None and view.deployment is None and not view.pods:
            del self.vllm[key]

    def consumers(self, namespace: str, cluster: str) -> list[Key]:
        """The VLLMDeployments that use an LMCacheCluster."""
        return [
            k for k, v in self.vllm.items() if k[0] == namespace and cluster_ref(v.body) == cluster
        ]
