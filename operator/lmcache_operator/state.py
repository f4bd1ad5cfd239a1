"""What the operator has seen through its watches, and status writing with coalescing.

Watch events (the LMCacheCluster, its DaemonSet and pods) update these maps; each event asks
for a status refresh of its cluster; refreshes of one cluster run one at a time and collapse
while one is queued, so a burst of pod events costs one status computation, not one each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name of the owning resource)
SETTLE_SECONDS = 0.01


def owner_key(obj: dict[str, Any], label: str) -> Key | None:
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


class Registry:
    """Per-cluster views plus a coalescing status refresher."""

    def __init__(self) -> None:
        self.views: dict[Key, ClusterView] = {}
        self.node_problems: dict[str, str] = {}  # node name -> "NotReady" or "deleted"
        self._locks: dict[Key, asyncio.Lock] = {}
        self._queued: set[Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.refresh: Callable[[Key, ClusterView], Awaitable[None]] | None = None

    def view(self, key: Key) -> ClusterView:
        return self.views.setdefault(key, ClusterView())

    def forget(self, key: Key) -> None:
        self.views.pop(key, None)
        self._locks.pop(key, None)

    def prune(self, key: Key) -> None:
        """Drop a view that holds nothing (its cluster and children are gone)."""
        view = self.views.get(key)
        if view is not None and view.body is None and view.daemonset is None and not view.pods:
            self.forget(key)

    def request_refresh(self, key: Key) -> None:
        if key in self._queued or self.refresh is None:
            return
        self._queued.add(key)
        task = asyncio.get_running_loop().create_task(self._run(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: Key) -> None:
        await asyncio.sleep(SETTLE_SECONDS)  # events of one burst arrive together: one write
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            self._queued.discard(key)
            view = self.views.get(key)
            if view is None or view.body is None or self.refresh is None:
                return
            try:
                await self.refresh(key, view)
            except Exception:
                logger.exception("status refresh of %s/%s failed; retrying in 1 s", *key)
                asyncio.get_running_loop().call_later(1.0, self.request_refresh, key)


REGISTRY = Registry()
