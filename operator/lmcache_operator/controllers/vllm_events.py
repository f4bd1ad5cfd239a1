"""Watch events a VLLMDeployment's status and gates follow: the resource, its Deployment and
pods, the LMCacheClusters it uses and their cache pods."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from lmcache_operator.builders.common import CLUSTER_LABEL, MANAGED_BY
from lmcache_operator.builders.credentials import public_keys_from_status
from lmcache_operator.builders.lmcachecluster import APP_NAME as CACHE_APP_NAME
from lmcache_operator.builders.vllm_status import pod_summary, ready_cache_nodes
from lmcache_operator.builders.vllmdeployment import APP_NAME, DEPLOYMENT_LABEL
from lmcache_operator.controllers.gates import GateController
from lmcache_operator.controllers.vllmdeployment import VLLMController, snapshot
from lmcache_operator.state import (
    CacheView,
    Key,
    Views,
    VLLMView,
    cluster_ref,
    forget_unseen,
    owner_key,
)

DEPLOYMENT_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY},app.kubernetes.io/name={APP_NAME}"
VLLM_POD_SELECTOR = f"app.kubernetes.io/name={APP_NAME},{DEPLOYMENT_LABEL}"
CACHE_POD_SELECTOR = f"app.kubernetes.io/name={CACHE_APP_NAME},{CLUSTER_LABEL}"


def cluster_snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """What consumers use of an LMCacheCluster: its identity and spec (a copy: kopf's body
    is reused), not its status or managedFields, which are most of its size."""
    meta = body["metadata"]
    return {
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "generation") if k in meta},
        "spec": copy.deepcopy(body.get("spec") or {}),
    }


def waiting(summary: Mapping[str, Any]) -> bool:
    """Gated, or ungated by us but not scheduled yet (its node list may need refreshing)."""
    spec = summary["spec"]
    return bool(spec["gated"] or (spec["cacheNodes"] is not None and not spec["nodeName"]))


class VLLMObserver:
    """Keeps the VLLMDeployment and cache views; routes changes to status, apply and gates."""

    def __init__(
        self,
        views: Views,
        controller: VLLMController,
        gates: GateController,
        cluster_status: Callable[[Key], None],  # an LMCacheCluster's consumer list moved
    ) -> None:
        self.views = views
        self.controller = controller
        self.gates = gates
        self.cluster_status = cluster_status

    def _consumers_changed(self, namespace: str) -> None:
        for key in list(self.views.clusters):
            if key[0] == namespace:
                self.cluster_status(key)

    def on_vllm_event(self, event: str, body: Mapping[str, Any]) -> None:
        key: Key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event == "DELETED":
            self.views.vllm.pop(key, None)
            self.controller.children.forget_owner(self.controller.kind, key)
            self._consumers_changed(key[0])
            return
        view = self.views.vllm.setdefault(key, VLLMView())
        before = cluster_ref(view.body) if view.body is not None else ""
        view.body = snapshot(body)
        cluster = cluster_ref(view.body)
        if cluster != before:
            self._consumers_changed(key[0])
        if cluster is not None and any(waiting(p) for p in view.pods.values()):
            self.gates.request((key[0], cluster))  # e.g. after a restart, pods seen first
        self.controller.status.request(key)

    def on_deployment(self, event: str, obj: dict[str, Any]) -> None:
        if event == "SYNCED":
            return
        key = owner_key(obj, DEPLOYMENT_LABEL)
        if key is None:
            return
        view = self.views.vllm.setdefault(key, VLLMView())
        view.deployment = None if event == "DELETED" else obj
        self.views.prune_vllm(key)
        self.controller.status.request(key)

    def on_vllm_pod(self, event: str, obj: dict[str, Any]) -> None:
        if event == "SYNCED":
            for changed in forget_unseen(((k, v.pods) for k, v in self.views.vllm.items()), obj):
                self.controller.status.request(changed)
            return
        key = owner_key(obj, DEPLOYMENT_LABEL)
        if key is None:
            return
        view = self.views.vllm.setdefault(key, VLLMView())
        name = obj["metadata"]["name"]
        if event == "DELETED":
            view.pods.pop(name, None)
            self.gates.forget_pod(key[0], name)
            self.views.prune_vllm(key)
        else:
            summary = pod_summary(obj)
            view.pods[name] = summary
            cluster = cluster_ref(view.body)
            self.gates.watch_pod(key, obj, bool(summary["spec"]["gated"]))
            if waiting(summary) and cluster is not None:
                self.gates.request((key[0], cluster))
        self.controller.status.request(key)

    def on_cache_pod(self, event: str, obj: dict[str, Any]) -> None:
        caches = self.views.caches
        if event == "SYNCED":
            changed = forget_unseen(((k, v.pods) for k, v in caches.items()), obj)
        else:
            meta = obj["metadata"]
            cluster_key = owner_key(obj, CLUSTER_LABEL)
            if cluster_key is None:
                return
            view = caches.setdefault(cluster_key, CacheView())
            if event == "DELETED":
                view.pods.pop(meta["name"], None)
            else:
                view.pods[meta["name"]] = {
                    "metadata": {"deletionTimestamp": meta.get("deletionTimestamp")},
                    "spec": {"nodeName": (obj.get("spec") or {}).get("nodeName")},
                    "status": {"conditions": (obj.get("status") or {}).get("conditions") or []},
                }
            changed = [cluster_key]
        for key in changed:
            view = caches[key]
            ready = ready_cache_nodes(list(view.pods.values()))
            if ready == view.ready_nodes:
                continue
            view.ready_nodes = ready
            for consumer in self.views.consumers(*key):
                self.controller.status.request(consumer)
            self.gates.request(key)

    def on_cache_cluster_event(self, event: str, body: Mapping[str, Any]) -> None:
        key: Key = (body["metadata"]["namespace"], body["metadata"]["name"])
        view = self.views.caches.setdefault(key, CacheView())
        if event == "DELETED":
            view.body, view.generation, view.keys = None, None, None
            changed = True
        else:
            generation = int(body["metadata"].get("generation", 0))
            keys = public_keys_from_status(body.get("status"))
            rolled_to = (keys.consumer_key, keys.server_public) if keys else None
            before = (view.keys.consumer_key, view.keys.server_public) if view.keys else None
            changed = view.body is None or view.generation != generation or rolled_to != before
            if not changed:
                return  # a status write or a kopf annotation: nothing a consumer uses
            view.body, view.generation, view.keys = cluster_snapshot(body), generation, keys
        for consumer in self.views.consumers(*key):
            if event != "DELETED":
                self.controller.applies.request(consumer)  # new settings roll the pods
            self.controller.status.request(consumer)
        self.gates.request(key)
