"""Removing a deleted cluster's L1 pools from its nodes (finalizer lmcache.dev/pool-cleanup).

A persistent pool lives in the host's ``/dev/shm``, outside every pod: external state, so
clusters with ``cache.persistent`` carry a finalizer (STYLE.md: none without external state).
When such a cluster is deleted the operator deletes its DaemonSet (the servers stop; the
rest of the children go with the cluster through garbage collection), runs one Job per node
the cluster ran on (``status.poolNodes``; builders/cleanup.py) and waits for them, at most
``--pool-cleanup-timeout`` after the deletion was asked for. Then it removes the finalizer;
a node it could not clean (a Job that failed or did not finish, a namespace being deleted,
which takes no new Jobs) is named in a Warning Event with the command to run there. While
the operator is down the cluster stays (Terminating): remove the finalizer by hand to skip
the cleanup (``kubectl patch lmcc NAME --type=json -p '[{"op": "remove", "path":
"/metadata/finalizers"}]'``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from lmcache_operator.api.common import API_VERSION
from lmcache_operator.api.lmcachecluster import KIND, LMCacheClusterSpec
from lmcache_operator.builders.cache_security import run_as, shm_dir
from lmcache_operator.builders.cleanup import (
    CLEANUP_LABEL,
    NODE_ANNOTATION,
    build_cleanup_job,
)
from lmcache_operator.builders.common import owner_reference
from lmcache_operator.builders.lmcachecluster import daemonset_name
from lmcache_operator.controllers.common import Settings
from lmcache_operator.controllers.events import post_event
from lmcache_operator.controllers.queue import Retry, WorkQueue
from lmcache_operator.kube import KubeClient, KubeError
from lmcache_operator.metrics import OperatorMetrics
from lmcache_operator.state import Key, Views
from lmcache_operator.status import now_rfc3339, parse_rfc3339

logger = logging.getLogger(__name__)

FINALIZER = "lmcache.dev/pool-cleanup"
POLL_S = 2.0


def pool_nodes(
    statuses: Iterable[Mapping[str, Any]], pod_nodes: set[str], gone: set[str]
) -> list[str]:
    """status.poolNodes: the nodes recorded before (in any of ``statuses``: the object's, and
    this process's last write, which a lagging watch may not show yet) and those running a
    pod now, without the nodes that were deleted (their /dev/shm went with them)."""
    recorded = {str(n) for status in statuses for n in status.get("poolNodes") or []}
    return sorted((recorded | pod_nodes) - gone)


class PoolCleanup:
    """Keeps the finalizer on persistent clusters and runs the cleanup when one is deleted."""

    def __init__(
        self, client: KubeClient, views: Views, metrics: OperatorMetrics, settings: Settings
    ) -> None:
        self.client = client
        self.views = views
        self.settings = settings
        self.queue = WorkQueue("cluster-cleanup", self.run, depth=metrics.queue_depth)
        self._jobs_made: set[Key] = set()
        self._first_seen: dict[Key, float] = {}

    async def ensure_finalizer(self, key: Key, persistent: bool, meta: Mapping[str, Any]) -> None:
        """A persistent cluster carries the finalizer (kept once set: its pools may stay
        on the nodes after persistent is turned off, until the servers there restart).
        ``meta``: the metadata the reconcile read; when it lists ours, no read is needed."""
        if persistent and FINALIZER not in (meta.get("finalizers") or []):
            await self._edit_finalizers(key, add=True)

    async def _edit_finalizers(self, key: Key, *, add: bool) -> bool:
        """Add or remove ours (a merge patch conditional on the resourceVersion: another
        writer's finalizers are kept); False when the cluster is gone."""
        for _ in range(5):
            body = await self.client.get(API_VERSION, KIND, *key)
            if body is None:
                return False
            meta = body["metadata"]
            finalizers = list(meta.get("finalizers") or [])
            if (FINALIZER in finalizers) == add or (add and meta.get("deletionTimestamp")):
                return True
            wanted = [*finalizers, FINALIZER] if add else [f for f in finalizers if f != FINALIZER]
            patch = {"metadata": {"finalizers": wanted or None,
                                  "resourceVersion": meta["resourceVersion"]}}  # fmt: skip
            try:
                await self.client.merge_patch(API_VERSION, KIND, key[0], key[1], patch)
                return True
            except KubeError as exc:
                if exc.status == 404:
                    return False
                if exc.status != 409:
                    raise
        raise Retry("the LMCacheCluster kept changing while its finalizer was edited")

    def on_deleting(self, key: Key, body: Mapping[str, Any]) -> None:
        """A watch event of a cluster being deleted."""
        if FINALIZER in (body["metadata"].get("finalizers") or []):
            self.queue.request(key)

    async def run(self, key: Key) -> None:
        body = await self.client.get(API_VERSION, KIND, *key)
        if body is None:
            self._jobs_made.discard(key)
            self._first_seen.pop(key, None)
            return
        meta = body["metadata"]
        if not meta.get("deletionTimestamp") or FINALIZER not in (meta.get("finalizers") or []):
            return
        try:
            spec = LMCacheClusterSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            await self._finish(key, body, {}, f"its spec is not valid any more ({exc})")
            return
        view = self.views.clusters.get(key)
        pods = {str(p["spec"]["nodeName"]) for p in (view.pods.values() if view else [])
                if p["spec"].get("nodeName")}  # fmt: skip
        gone = {n for n, why in self.views.node_problems.items() if why == "deleted"}
        written = [view.last_written] if view and view.last_written else []
        nodes = pool_nodes([body.get("status") or {}, *written], pods, gone)
        # from the deletion, or from when this process saw it (the operator was down)
        first_seen = self._first_seen.setdefault(key, time.time())
        deleted_at = parse_rfc3339(str(meta["deletionTimestamp"]))
        deadline = self.settings.pool_cleanup_timeout_s + max(
            time.time() if deleted_at is None else deleted_at, first_seen
        )
        if key not in self._jobs_made:
            refused = await self._start(key, body, spec, nodes, deadline)
            if refused:
                await self._finish(key, body, {n: refused for n in nodes}, "")
                return
            self._jobs_made.add(key)
        results = await self._results(key, nodes)
        if all(r in ("done", "failed") for r in results.values()) or time.time() >= deadline:
            left = {n: why for n, why in results.items() if why != "done"}
            await self._finish(key, body, left, "")
            return
        self.queue.request_later(POLL_S, key)

    async def _start(
        self, key: Key, body: Mapping[str, Any], spec: LMCacheClusterSpec,
        nodes: list[str], deadline: float,
    ) -> str:  # fmt: skip
        """Stop the servers, create the Jobs; why it cannot ('' when it could)."""
        namespace, name = key
        await self.client.delete("apps/v1", "DaemonSet", namespace, daemonset_name(name),
                                 propagation="Background")  # fmt: skip
        owner = {"apiVersion": API_VERSION, "kind": KIND, "metadata": body["metadata"]}
        run_s = max(30, int(deadline - time.time()))
        for node in nodes:
            job = build_cleanup_job(
                name, namespace, spec, node, deadline_s=run_s,
                policy=self.settings.policy, images=self.settings.images,
            )  # fmt: skip
            job["metadata"]["ownerReferences"] = [owner_reference(owner)]
            try:
                await self.client.create(job)
            except KubeError as exc:
                if exc.status == 409:
                    continue  # made before (an earlier operator process)
                if exc.status == 403 and "terminat" in str(exc.body).lower():
                    return "the namespace is being deleted and takes no cleanup Job"
                raise
        logger.info("%s/%s deleted: removing its L1 pools on %s", namespace, name,
                    ", ".join(nodes) or "no node")  # fmt: skip
        return ""

    async def _results(self, key: Key, nodes: list[str]) -> dict[str, str]:
        """Per node: done, failed (the Job's reason), or running."""
        listing = await self.client.list("batch/v1", "Job", key[0],
                                         label_selector=f"{CLEANUP_LABEL}={key[1]}")  # fmt: skip
        results = dict.fromkeys(nodes, "running")
        for job in listing.get("items") or []:
            node = (job["metadata"].get("annotations") or {}).get(NODE_ANNOTATION)
            if node not in results:
                continue
            status = job.get("status") or {}
            if int(status.get("succeeded") or 0) > 0:
                results[node] = "done"
            for condition in status.get("conditions") or []:
                if condition.get("type") == "Failed" and condition.get("status") == "True":
                    results[node] = f"failed: {condition.get('reason')}: {condition.get('message')}"
        return results

    async def _finish(
        self, key: Key, body: Mapping[str, Any], left: Mapping[str, str], problem: str
    ) -> None:
        namespace, name = key
        spec_body = body.get("spec") or {}
        try:
            uid, _ = run_as(name, namespace, LMCacheClusterSpec.model_validate(spec_body))
            user = f" as uid {uid}"
        except ValidationError:
            user = ""
        involved = {"apiVersion": API_VERSION, "kind": KIND, "metadata": body["metadata"]}
        if left or problem:
            where = "; ".join(f"{n} ({why})" for n, why in sorted(left.items())) or problem
            message = (f"the L1 pool may be left in {shm_dir(namespace, name)} on {where}: run "
                       f"`lmcache-node pool remove --shm-dir {shm_dir(namespace, name)}`{user} "
                       "there, or delete the directory")  # fmt: skip
            reason, warning = "PoolCleanupIncomplete", True
        else:
            message, reason, warning = "removed the L1 pools of its nodes", "PoolsRemoved", False
        logger.log(logging.WARNING if warning else logging.INFO, "%s/%s: %s",
                   namespace, name, message)  # fmt: skip
        try:
            await post_event(self.client, involved, reason=reason, message=message,
                             warning=warning, now=now_rfc3339())  # fmt: skip
        except KubeError as exc:  # e.g. the namespace is being deleted
            logger.info("no Event for %s/%s (%s)", namespace, name, exc)
        await self._edit_finalizers(key, add=False)
        self._jobs_made.discard(key)
        self._first_seen.pop(key, None)
