"""Scheduling gates of vLLM pods (colocateWithCache=Required) and their timeout fallback.

A consumer pod starts gated; once a node has a Ready cache pod of its LMCacheCluster the
pod's node affinity is narrowed to such nodes and the gate lifted. A pod still gated after
``Settings.gate_timeout_s`` is never left silently Pending: it gets a Warning Event and a
pod condition ``lmcache.dev/CacheGate`` (False, with the reason), and stays gated, because
Required colocation means it must not run without a local cache.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from lmcache_operator.builders.vllm_connector import HOSTNAME_LABEL, SCHEDULING_GATE
from lmcache_operator.builders.vllm_status import CACHE_NODES_ANNOTATION
from lmcache_operator.controllers.common import Settings
from lmcache_operator.controllers.queue import Retry, WorkQueue
from lmcache_operator.kube import KubeClient, KubeError
from lmcache_operator.metrics import OperatorMetrics
from lmcache_operator.state import CacheView, Key, Views, cluster_ref
from lmcache_operator.status import now_rfc3339

logger = logging.getLogger(__name__)

GATE_CONDITION = "lmcache.dev/CacheGate"
TIMEOUT_REASON = "CacheGateTimeout"


def narrowed_affinity(pod_spec: Mapping[str, Any], nodes: list[str]) -> dict[str, Any]:
    """The pod's affinity restricted to ``nodes`` (only additions: allowed on gated pods)."""
    affinity = copy.deepcopy(pod_spec.get("affinity") or {})
    node_affinity = affinity.setdefault("nodeAffinity", {})
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = required.get("nodeSelectorTerms") or []
    if not terms:  # exact node names (matchFields allows one value per requirement)
        terms = [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
            for node in nodes
        ]
    else:  # the user's terms: AND a hostname requirement into each
        for term in terms:
            term.setdefault("matchExpressions", []).append(
                {"key": HOSTNAME_LABEL, "operator": "In", "values": list(nodes)}
            )
    node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": terms}
    return affinity


def stale_placement(summary: Mapping[str, Any], ready: list[str]) -> bool:
    """An ungated pod still unscheduled whose node list lacks a node that is ready now."""
    allowed = summary["spec"].get("cacheNodes")
    if allowed is None or summary["spec"].get("nodeName"):
        return False
    return bool(set(ready) - set(allowed.split(",")))


def age_s(obj: Mapping[str, Any]) -> float:
    created = obj["metadata"].get("creationTimestamp")
    if not created:
        return 0.0
    then = datetime.strptime(str(created), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return max(0.0, time.time() - then.timestamp())


class GateController:
    """Lifts gates per LMCacheCluster; reports pods that waited longer than the timeout."""

    def __init__(
        self, client: KubeClient, views: Views, metrics: OperatorMetrics, settings: Settings
    ) -> None:
        self.client = client
        self.views = views
        self.metrics = metrics
        self.settings = settings
        self.queue = WorkQueue("gates", self.lift_gates, depth=metrics.queue_depth)
        self._timers: dict[Key, asyncio.TimerHandle] = {}  # (namespace, pod) -> timeout check
        self._reported: set[Key] = set()

    def request(self, cluster_key: Key) -> None:
        self.queue.request(cluster_key)

    async def lift_gates(self, cluster_key: Key) -> None:
        """Place every gated consumer pod on a node whose cache pod is Ready, then ungate it."""
        namespace, cluster = cluster_key
        cluster_view = self.views.caches.get(cluster_key, CacheView())
        ready = sorted(cluster_view.ready_nodes)
        if not ready or cluster_view.body is None:
            return  # pods stay gated (Pending, SchedulingGated) until a cache pod is Ready
        for consumer in self.views.consumers(namespace, cluster):
            view = self.views.vllm[consumer]
            for pod_name, summary in list(view.pods.items()):
                if summary["metadata"].get("deletionTimestamp"):
                    continue
                if summary["spec"]["gated"]:
                    await self._ungate(namespace, pod_name, ready)
                elif stale_placement(summary, ready):
                    await self._restart_unscheduled(namespace, pod_name)

    async def _restart_unscheduled(self, namespace: str, pod_name: str) -> None:
        """Delete it: its ReplicaSet creates a gated replacement, placed on today's nodes."""
        pod = await self.client.get("v1", "Pod", namespace, pod_name)
        if pod is None or pod["spec"].get("nodeName"):
            return
        version = pod["metadata"]["resourceVersion"]
        try:
            await self.client.delete("v1", "Pod", namespace, pod_name, resource_version=version)
        except KubeError as exc:
            if exc.status == 409:
                raise Retry(f"pod {pod_name} changed meanwhile") from exc
            raise
        logger.info("pod %s/%s restarted: more nodes have a ready cache now", namespace, pod_name)

    async def _ungate(self, namespace: str, pod_name: str, nodes: list[str]) -> None:
        pod = await self.client.get("v1", "Pod", namespace, pod_name)
        if pod is None:
            return
        gates = pod["spec"].get("schedulingGates") or []
        if not any(g.get("name") == SCHEDULING_GATE for g in gates):
            return
        patch = {
            "metadata": {
                "resourceVersion": pod["metadata"]["resourceVersion"],
                "annotations": {CACHE_NODES_ANNOTATION: ",".join(nodes)},
            },
            "spec": {"affinity": narrowed_affinity(pod["spec"], nodes)},
        }
        rest = [g for g in gates if g.get("name") != SCHEDULING_GATE]
        try:
            await self.client.merge_patch("v1", "Pod", namespace, pod_name, patch)
            await self.client.merge_patch(
                "v1", "Pod", namespace, pod_name, {"spec": {"schedulingGates": rest or None}}
            )
        except KubeError as exc:
            if exc.status == 404:
                return
            if exc.status == 409:
                raise Retry(f"pod {pod_name} changed meanwhile") from exc
            logger.warning("cannot ungate pod %s/%s: %s", namespace, pod_name, exc)
            return
        self.metrics.gates_released.inc()
        self.forget_pod(namespace, pod_name)
        logger.info("pod %s/%s may run on %s", namespace, pod_name, ", ".join(nodes))

    # ---- the timeout fallback ------------------------------------------------------------

    def watch_pod(self, owner: Key, pod: Mapping[str, Any], gated: bool) -> None:
        """Called for every vLLM pod event: arm (or disarm) its gate timeout."""
        key: Key = (owner[0], str(pod["metadata"]["name"]))
        ours = any(
            g.get("name") == SCHEDULING_GATE for g in pod["spec"].get("schedulingGates") or []
        )
        if not (gated and ours) or pod["metadata"].get("deletionTimestamp"):
            self.forget_pod(*key)
            return
        if key in self._timers or key in self._reported:
            return
        delay = max(0.0, self.settings.gate_timeout_s - age_s(pod))
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(
            delay, lambda: loop.create_task(self._timed_out(owner, key[1]))
        )

    def forget_pod(self, namespace: str, pod_name: str) -> None:
        timer = self._timers.pop((namespace, pod_name), None)
        if timer is not None:
            timer.cancel()
        self._reported.discard((namespace, pod_name))

    def why_gated(self, owner: Key) -> str:
        """Why no node can take the consumer's pods (for the Event and the condition)."""
        view = self.views.vllm.get(owner)
        cluster = cluster_ref(view.body if view else None)
        if cluster is None:
            return "the VLLMDeployment no longer names an LMCacheCluster"
        cache = self.views.caches.get((owner[0], cluster))
        if cache is None or cache.body is None:
            return f"LMCacheCluster {cluster!r} does not exist in namespace {owner[0]}"
        if not cache.ready_nodes:
            return f"no node has a Ready cache pod of LMCacheCluster {cluster!r}"
        return (
            f"nodes with a Ready cache pod of LMCacheCluster {cluster!r} "
            f"({', '.join(sorted(cache.ready_nodes))}) cannot take it"
        )

    async def _timed_out(self, owner: Key, pod_name: str) -> None:
        key: Key = (owner[0], pod_name)
        self._timers.pop(key, None)
        pod = await self.client.get("v1", "Pod", owner[0], pod_name)
        gates = (pod or {}).get("spec", {}).get("schedulingGates") or []
        if pod is None or not any(g.get("name") == SCHEDULING_GATE for g in gates):
            return
        self._reported.add(key)
        self.metrics.gates_timed_out.inc()
        why = self.why_gated(owner)
        message = (
            f"still gated after {self.settings.gate_timeout_s:.0f} s: {why}; it stays Pending "
            f"(cache.colocateWithCache=Required) until a cache pod is Ready on a node that "
            f"fits it"
        )
        logger.warning("pod %s/%s %s", owner[0], pod_name, message)
        try:
            await self._report(pod, message)
        except KubeError as exc:
            logger.warning("cannot report the gate timeout of %s/%s: %s", owner[0], pod_name, exc)

    async def _report(self, pod: Mapping[str, Any], message: str) -> None:
        meta = pod["metadata"]
        now = now_rfc3339()
        condition = {
            "type": GATE_CONDITION,
            "status": "False",
            "reason": TIMEOUT_REASON,
            "message": message,
            "lastTransitionTime": now,
        }
        await self.client.merge_patch(
            "v1", "Pod", meta["namespace"], meta["name"],
            {"status": {"conditions": [condition]}},
            subresource="status", strategic=True,
        )  # fmt: skip
        await self.client.create(
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "uid": meta["uid"],
                },
                "type": "Warning",
                "reason": TIMEOUT_REASON,
                "message": message,
                "source": {"component": "lmcache-operator"},
                "reportingComponent": "lmcache-operator",
                "reportingInstance": "lmcache-operator",
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            }
        )
