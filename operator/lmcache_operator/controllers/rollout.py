"""The operator's own rollout of a cache DaemonSet, node by node, keeping each node's pool.

The DaemonSet is ``OnDelete`` (builders/lmcachecluster.py), so a new spec reaches a node only
when its cache pod is deleted. With ``updateStrategy.type: RollingUpdate`` (the default) the
operator does that itself, ``maxUnavailable`` nodes at a time: it marks the vLLM pods of the
cluster's VLLMDeployments on that node (annotation ``lmcache.dev/cache-rollout``), deletes the
old pod (the DaemonSet controller makes the new one), waits until the new pod is Ready (the
server is ready once it has opened its pool: adopted, or new) and its pool was read from
``/readyz`` (pool_probe.py), removes the marks, and moves on. vLLM keeps serving meanwhile:
its connector reconnects, and lookups during the restart are misses.

Level-based: each step recomputes the nodes' states from the pods the watches show (a pod's
annotation ``lmcache.dev/template-hash`` says which template it runs), so a restarted
operator picks the rollout up where it was; what it measured (seconds, adopted bytes) is
kept in ``status.rollout`` and read back for the same revision.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.builders.cache_rollout import TEMPLATE_HASH_ANNOTATION, operator_rolls
from lmcache_operator.builders.vllm_status import CACHE_ROLLOUT_ANNOTATION
from lmcache_operator.controllers.pool_probe import PoolProbe, PoolProbes, PoolReport
from lmcache_operator.controllers.queue import WorkQueue
from lmcache_operator.kube import KubeClient, KubeError
from lmcache_operator.metrics import OperatorMetrics
from lmcache_operator.podfailures import describe
from lmcache_operator.state import ClusterView, Key, Views
from lmcache_operator.status import now_rfc3339, parse_rfc3339, pod_failures, pod_ready

logger = logging.getLogger(__name__)

IN_PROGRESS = ("Replacing", "Starting")
ORDER = {"Replacing": 0, "Starting": 1, "Waiting": 2, "Updated": 3}
MAX_NODES_IN_STATUS = 256
Wall = Callable[[], float]


@dataclass
class NodeRoll:
    state: str = "Waiting"
    pod: str = ""
    old_pod: str = ""
    started_at: str = ""
    started: float | None = None  # wall clock seconds (restart-safe through started_at)
    seconds: float | None = None
    pool: PoolReport | None = None
    message: str = ""
    failing: bool = False  # the new pod cannot run (crash loop, image pull): the roll stops


@dataclass
class Rollout:
    revision: str
    started_at: str
    completed_at: str = ""
    state: str = "RollingOut"
    message: str = ""
    nodes: dict[str, NodeRoll] = field(default_factory=dict)
    marks_sent: dict[tuple[str, str], str | None] = field(default_factory=dict)


def max_unavailable(value: int | str, nodes: int) -> int:
    """updateStrategy.maxUnavailable as a node count: a number, or a percent of the nodes
    (rounded up, as the DaemonSet controller does), at least 1."""
    if isinstance(value, str) and value.endswith("%"):
        try:
            return max(1, math.ceil(float(value[:-1]) * nodes / 100))
        except ValueError:
            return 1
    try:
        return max(1, int(value))
    except ValueError:
        return 1


def _seeded(revision: str, previous: Mapping[str, Any]) -> Rollout:
    """A rollout from the status of an earlier process (same revision)."""
    rollout = Rollout(
        revision, str(previous.get("startedAt") or now_rfc3339()),
        completed_at=str(previous.get("completedAt") or ""),
    )  # fmt: skip
    for item in previous.get("nodes") or []:
        pool = item.get("pool")
        rollout.nodes[str(item["node"])] = NodeRoll(
            state=str(item.get("state") or "Waiting"),
            pod=str(item.get("pod") or ""),
            started_at=str(item.get("startedAt") or ""),
            started=parse_rfc3339(str(item.get("startedAt") or "")),
            seconds=item.get("seconds"),
            pool=PoolReport(
                str(pool),
                adopted_entries=int(item.get("adoptedEntries") or 0),
                adopted_bytes=int(item.get("adoptedBytes") or 0),
            )
            if pool
            else None,
            message=str(item.get("message") or ""),
        )
    return rollout


class RolloutController:
    """Steps each cluster's rollout when its DaemonSet, pods or nodes move."""

    def __init__(
        self,
        client: KubeClient,
        views: Views,
        metrics: OperatorMetrics,
        refresh_status: Callable[[Key], None],
        *,
        probe: PoolProbe,
        probe_budget_s: float,
        wall: Wall = time.time,
    ) -> None:
        self.client = client
        self.views = views
        self.refresh_status = refresh_status
        self.wall = wall
        self.queue = WorkQueue(
            "cluster-rollout", self.step, settle_s=0.02, depth=metrics.queue_depth
        )
        self.probes = PoolProbes(probe, probe_budget_s, self.queue.request)
        self.rollouts: dict[Key, Rollout] = {}

    def forget(self, key: Key) -> None:
        self.rollouts.pop(key, None)
        self.probes.keep(key, set())
        self.queue.forget(key)

    async def step(self, key: Key) -> None:
        view = self.views.clusters.get(key)
        if view is None or view.body is None or view.daemonset is None or view.applied is None:
            return
        if view.applied.problems or view.body["metadata"].get("deletionTimestamp"):
            return
        try:
            spec = LMCacheClusterSpec.model_validate(view.body.get("spec") or {})
        except ValidationError:
            return
        ds = view.daemonset
        if int(ds["metadata"].get("generation", 0)) < view.applied.daemonset_generation:
            return  # our last apply's DaemonSet has not been seen yet
        template_meta = ((ds.get("spec") or {}).get("template") or {}).get("metadata") or {}
        revision = (template_meta.get("annotations") or {}).get(TEMPLATE_HASH_ANNOTATION)
        if not revision:
            return
        rollout = self._rollout(key, str(revision), view)
        self.probes.keep(key, {p["metadata"].get("uid", "") for p in view.pods.values()})
        self._observe(key, rollout, view, spec.server.http_port)
        if operator_rolls(spec):
            await self._advance(key, rollout, view, spec)
        self._summarize(rollout, spec)
        await self._mark_consumers(key, rollout)
        self.refresh_status(key)

    def _rollout(self, key: Key, revision: str, view: ClusterView) -> Rollout:
        rollout = self.rollouts.get(key)
        if rollout is not None and rollout.revision == revision:
            return rollout
        previous = ((view.body or {}).get("status") or {}).get("rollout") or {}
        if rollout is None and previous.get("revision") == revision:
            rollout = _seeded(revision, previous)
        else:
            rollout = Rollout(revision, now_rfc3339())
        self.rollouts[key] = rollout
        return rollout

    def _observe(self, key: Key, rollout: Rollout, view: ClusterView, port: int) -> None:
        """Each node's state from its pods."""
        by_node: dict[str, list[Mapping[str, Any]]] = {}
        for pod in view.pods.values():
            node = pod["spec"].get("nodeName")
            if node and pod["status"].get("phase") not in ("Succeeded", "Failed"):
                by_node.setdefault(str(node), []).append(pod)
        for node in [n for n, r in rollout.nodes.items() if n not in by_node]:
            # a node between its old pod and the new stays, unless the node itself is gone
            # (it would count as in progress forever and hold up the other nodes)
            deleted = self.views.node_problems.get(node) == "deleted"
            if rollout.nodes[node].state != "Replacing" or deleted:
                del rollout.nodes[node]
        for node, pods in sorted(by_node.items()):
            roll = rollout.nodes.setdefault(node, NodeRoll())
            live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
            current = [p for p in live if p["metadata"].get("templateHash") == rollout.revision]
            if current:
                self._observe_current(key, node, roll, current[0], port)
            elif live:
                if not (roll.state == "Replacing" and roll.old_pod == live[0]["metadata"]["name"]):
                    roll.state, roll.message = "Waiting", "runs an older spec"
            else:
                if roll.started is None:  # deleted by someone else: it is being replaced too
                    roll.started, roll.started_at = self.wall(), now_rfc3339()
                roll.state, roll.message = "Replacing", "the old cache pod is stopping"

    def _observe_current(
        self, key: Key, node: str, roll: NodeRoll, pod: Mapping[str, Any], port: int
    ) -> None:
        name = str(pod["metadata"]["name"])
        if roll.pod != name and roll.state == "Updated":
            roll.seconds, roll.pool = None, None  # a new pod of the same spec (deleted, evicted)
        roll.pod = name
        roll.failing = False
        if not pod_ready(pod) or node in self.views.node_problems:
            failures = pod_failures(pod)
            roll.state, roll.failing = "Starting", bool(failures)
            roll.message = (
                f"{name} cannot run: {describe(failures)}"
                if failures
                else f"waiting for {name} to be ready"
            )
            return
        status = pod["status"]
        address = status.get("hostIP") if pod["spec"].get("hostNetwork") else status.get("podIP")
        report = self.probes.ensure(key, str(pod["metadata"].get("uid", "")), address or "", port)
        if report is None:
            roll.state, roll.message = "Starting", f"reading the pool of {name} (/readyz)"
            return
        if roll.state != "Updated":
            if roll.started is not None and roll.seconds is None:
                roll.seconds = round(max(0.0, self.wall() - roll.started), 1)
            roll.pool = report
            roll.message = "" if report.state == "adopted" else _not_adopted(report)
            if roll.started is not None:
                logger.info(
                    "rollout of %s/%s: %s updated in %s s, pool %s (%d chunks, %d bytes adopted)",
                    key[0], key[1], node, roll.seconds, report.state,
                    report.adopted_entries, report.adopted_bytes,
                )  # fmt: skip
        roll.state = "Updated"

    async def _advance(
        self, key: Key, rollout: Rollout, view: ClusterView, spec: LMCacheClusterSpec
    ) -> None:
        """Replace old pods while fewer than maxUnavailable nodes are in progress."""
        healthy = {n: r for n, r in rollout.nodes.items() if n not in self.views.node_problems}
        budget = max_unavailable(spec.update_strategy.max_unavailable, len(healthy))
        old_pods = {
            str(p["spec"]["nodeName"]): p
            for p in view.pods.values()
            if p["spec"].get("nodeName") in healthy
            and not p["metadata"].get("deletionTimestamp")
            and p["metadata"].get("templateHash") != rollout.revision
        }
        waiting = [n for n, r in healthy.items() if r.state == "Waiting" and n in old_pods]
        unavailable = sum(r.state in IN_PROGRESS for r in healthy.values())
        unavailable += sum(not pod_ready(old_pods[n]) for n in waiting)
        # an old pod that is not ready anyway costs nothing to replace: those first
        for node in sorted(waiting, key=lambda n: (pod_ready(old_pods[n]), n)):
            was_ready = pod_ready(old_pods[node])
            if was_ready and unavailable >= budget:
                break
            await self._replace(key, rollout, node, old_pods[node])
            unavailable += int(was_ready)

    async def _replace(self, key: Key, rollout: Rollout, node: str, pod: Mapping[str, Any]) -> None:
        name, uid = str(pod["metadata"]["name"]), str(pod["metadata"].get("uid") or "")
        roll = rollout.nodes[node]
        roll.state, roll.old_pod, roll.message = "Replacing", name, f"replacing {name}"
        roll.started, roll.started_at = self.wall(), now_rfc3339()
        roll.seconds, roll.pool = None, None
        await self._mark_consumers(key, rollout)  # marked before their cache goes away
        logger.info("rollout of %s/%s: replacing cache pod %s on %s", key[0], key[1], name, node)
        try:
            await self.client.delete("v1", "Pod", key[0], name, uid=uid or None)
        except KubeError as exc:
            if exc.status != 409:  # 409: that pod (uid) is gone already
                raise

    def _summarize(self, rollout: Rollout, spec: LMCacheClusterSpec) -> None:
        nodes = rollout.nodes
        updated = [n for n, r in nodes.items() if r.state == "Updated"]
        moving = sorted(n for n, r in nodes.items() if r.state in IN_PROGRESS)
        waiting = sorted(n for n, r in nodes.items() if r.state == "Waiting")
        if len(updated) == len(nodes):
            rollout.state = "Complete"
            rollout.message = f"{len(nodes)} node(s) run the current spec"
            rollout.completed_at = rollout.completed_at or now_rfc3339()
            return
        rollout.completed_at = ""
        progress = f"{len(updated)} of {len(nodes)} node(s) updated"
        blocked = [n for n in moving if nodes[n].failing]
        if not operator_rolls(spec):
            manual = spec.update_strategy.type == "OnDelete"
            rollout.state = "Manual" if manual else "DaemonSet"
            rollout.message = f"{progress}; " + (
                "updateStrategy.type OnDelete: delete the cache pods on "
                f"{', '.join(waiting)} to update them"
                if manual
                else "the DaemonSet controller rolls the pods (updateStrategy.maxSurge)"
            )
        elif blocked:
            rollout.state = "Blocked"
            rollout.message = (
                f"{progress}; stopped: {nodes[blocked[0]].message} on {blocked[0]}; the other "
                "nodes keep the previous spec until it runs (fix the spec, or the node)"
            )
        else:
            rollout.state = "RollingOut"
            parts = [progress]
            if moving:
                parts.append("replacing the cache pod on " + ", ".join(moving))
            sick = [n for n in waiting if n in self.views.node_problems]
            if sick:
                parts.append("waiting for " + ", ".join(sick) + " (node not ready)")
            rollout.message = "; ".join(parts)

    async def _mark_consumers(self, key: Key, rollout: Rollout) -> None:
        """Annotate the cluster's vLLM pods on the nodes in progress; unmark the others."""
        moving = {n: r for n, r in rollout.nodes.items() if r.state in IN_PROGRESS}
        for consumer in self.views.consumers(*key):
            view = self.views.vllm.get(consumer)
            for name, pod in list((view.pods if view else {}).items()):
                roll = moving.get(str(pod["spec"].get("nodeName") or ""))
                wanted = (
                    f"{roll.old_pod or roll.pod} replaced since {roll.started_at}" if roll else None
                )
                seen = pod["metadata"].get("cacheRollout")
                pod_key = (consumer[0], name)
                if seen == wanted or rollout.marks_sent.get(pod_key, "") == wanted:
                    continue
                patch = {"metadata": {"annotations": {CACHE_ROLLOUT_ANNOTATION: wanted}}}
                try:
                    await self.client.merge_patch("v1", "Pod", consumer[0], name, patch)
                except KubeError as exc:
                    if exc.status != 404:
                        raise
                rollout.marks_sent[pod_key] = wanted

    def status(self, key: Key) -> dict[str, Any] | None:
        """status.rollout, or None before the first step."""
        rollout = self.rollouts.get(key)
        if rollout is None:
            return None
        ordered = sorted(rollout.nodes.items(), key=lambda item: (ORDER[item[1].state], item[0]))
        nodes = []
        for node, roll in ordered[:MAX_NODES_IN_STATUS]:
            entry: dict[str, Any] = {
                "node": node, "state": roll.state, "pod": roll.pod,
                "startedAt": roll.started_at, "message": roll.message,
            }  # fmt: skip
            if roll.seconds is not None:
                entry["seconds"] = roll.seconds
            if roll.pool is not None:
                entry["pool"] = roll.pool.state
                entry["adoptedEntries"] = roll.pool.adopted_entries
                entry["adoptedBytes"] = roll.pool.adopted_bytes
            nodes.append(entry)
        return {
            "revision": rollout.revision,
            "state": rollout.state,
            "updatedNodes": sum(r.state == "Updated" for r in rollout.nodes.values()),
            "desiredNodes": len(rollout.nodes),
            "nodesInProgress": sorted(
                n for n, r in rollout.nodes.items() if r.state in IN_PROGRESS
            ),
            "startedAt": rollout.started_at,
            "completedAt": rollout.completed_at,
            "message": rollout.message,
            "nodes": nodes,
        }

    def pool_of(self, uid: str) -> dict[str, Any] | None:
        """endpoints[].pool of a cache pod, once read."""
        report = self.probes.report(uid)
        return report.to_status() if report is not None else None

    async def close(self) -> None:
        await self.queue.close()
        await self.probes.close()


def _not_adopted(report: PoolReport) -> str:
    reason = f": {report.reason}" if report.reason else ""
    return f"the new server did not adopt the pool ({report.state}{reason})"
