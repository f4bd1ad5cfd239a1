"""Opt-in injection: answering the admission webhook, and reporting pods it could not wire.

Every operator replica answers admission reviews (``AdmissionController.review``; the
webhook server runs outside the leader election, wiring/admission.py): a review reads the
pod's cluster's connection ConfigMap (cached a few seconds) and answers with a JSON patch,
``allowed`` always — the webhook never blocks a pod. What it could not do it writes into the
pod's annotations (``lmcache.dev/injection``, ``lmcache.dev/injection-message``).

The leader's ``InjectionReporter`` watches pods labelled ``lmcache.dev/cluster`` and posts a
Warning Event on each one that is not fully wired: ``partial`` or ``failed`` (the webhook
said why), or no annotation at all (the webhook was unreachable or not installed: with
``failurePolicy: Ignore`` the pod was created unwired). It then marks the pod
(``lmcache.dev/injection-reported``), so a restart or a new leader does not report it again.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import jsonpatch

from lmcache_operator.builders.common import CLUSTER_LABEL, MANAGED_BY
from lmcache_operator.builders.connection import Connection, connection_configmap_name
from lmcache_operator.builders.injection import (
    FAILED,
    INJECTED,
    INJECTION_ANNOTATION,
    MESSAGE_ANNOTATION,
    PARTIAL,
    REPORTED_ANNOTATION,
    already_handled,
    failed,
    inject,
)
from lmcache_operator.controllers.common import MONOTONIC, Clock
from lmcache_operator.controllers.events import post_event
from lmcache_operator.controllers.queue import WorkQueue
from lmcache_operator.kube import KubeClient, KubeError
from lmcache_operator.metrics import OperatorMetrics
from lmcache_operator.status import now_rfc3339

logger = logging.getLogger(__name__)

WEBHOOK_PODS = "pods"  # pods labelled lmcache.dev/cluster
WEBHOOK_NAMESPACES = "namespaces"  # pods in a namespace labelled lmcache.dev/cluster
LOOKUP_TTL_S = 5.0
MAX_CACHED = 4096
MAX_CONCURRENT_LOOKUPS = 16  # reviews name clusters freely: bound the API reads they cause
REPORTED_POD_SELECTOR = f"{CLUSTER_LABEL},app.kubernetes.io/managed-by!={MANAGED_BY}"
REASONS = {
    PARTIAL: "LMCacheInjectionPartial",
    FAILED: "LMCacheInjectionFailed",
    None: "LMCacheNotInjected",
}


class Lookups:
    """Reads the API server for reviews: connection ConfigMaps and namespace labels, each
    kept ``ttl_s`` (also when missing), at most ``MAX_CACHED`` entries."""

    def __init__(
        self, client: KubeClient, *, ttl_s: float = LOOKUP_TTL_S, clock: Clock = MONOTONIC
    ) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.clock = clock
        self._cache: dict[tuple[str, str, str], tuple[float, Any]] = {}
        self._limit = asyncio.Semaphore(MAX_CONCURRENT_LOOKUPS)

    async def _cached(self, key: tuple[str, str, str], read: Any) -> Any:
        hit = self._cache.get(key)
        if hit is not None and hit[0] > self.clock():
            return hit[1]
        async with self._limit:
            value = await read()
        if len(self._cache) >= MAX_CACHED:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (self.clock() + self.ttl_s, value)
        return value

    async def connection(self, namespace: str, cluster: str) -> tuple[Connection | None, str]:
        """The cluster's contract, or None and why (each reason says what to do)."""
        name = connection_configmap_name(cluster)

        async def read() -> dict[str, Any] | None:
            return await self.client.get("v1", "ConfigMap", namespace, name)

        configmap = await self._cached(("cm", namespace, name), read)
        if configmap is None:
            return None, (
                f"no LMCacheCluster {cluster!r} is set up in namespace {namespace} (ConfigMap "
                f"{name} does not exist): create the cluster, or fix the {CLUSTER_LABEL} label"
            )
        try:
            return Connection.from_data(configmap.get("data") or {}), ""
        except ValueError as exc:
            return None, f"ConfigMap {namespace}/{name} is not a connection contract: {exc}"

    async def namespace_cluster(self, namespace: str) -> str:
        """The cluster a namespace's label names ('' when none)."""

        async def read() -> str:
            body = await self.client.get("v1", "Namespace", None, namespace)
            labels = ((body or {}).get("metadata") or {}).get("labels") or {}
            return str(labels.get(CLUSTER_LABEL, ""))

        return str(await self._cached(("ns", "", namespace), read))


def _response(uid: str, patch: list[dict[str, Any]] | None, warning: str = "") -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        text = jsonpatch.JsonPatch(patch).to_string()
        response["patch"] = base64.b64encode(text.encode("utf-8")).decode("ascii")
    if warning:
        response["warnings"] = [warning[:250]]
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


class AdmissionController:
    """Answers AdmissionReviews of pod creations (both replicas; no state but a cache)."""

    def __init__(self, lookups: Lookups, metrics: OperatorMetrics) -> None:
        self.lookups = lookups
        self.metrics = metrics

    async def review(self, body: Mapping[str, Any], webhook: str | None) -> dict[str, Any]:
        """The review's answer: always allowed; a patch wiring the pod, or annotating why not."""
        request = body.get("request") if isinstance(body, Mapping) else None
        if not isinstance(request, Mapping):
            return _response("", None)
        uid = str(request.get("uid", ""))
        pod = request.get("object")
        if request.get("operation") != "CREATE" or not isinstance(pod, Mapping):
            return _response(uid, None)
        if already_handled(pod):
            self.metrics.admissions.labels(outcome="skipped").inc()
            return _response(uid, None)
        namespace = str(request.get("namespace") or (pod.get("metadata") or {}).get("namespace"))
        try:
            injected = await self._wire(pod, namespace, webhook)
        except Exception as exc:  # the pod must never be blocked by a bug of ours
            logger.exception("admission review %s in %s failed", uid, namespace)
            message = f"the operator failed to wire it: {exc}"
            injected = failed(pod, self._cluster_label(pod), message)
        if injected is None:
            self.metrics.admissions.labels(outcome="skipped").inc()
            return _response(uid, None)
        self.metrics.admissions.labels(outcome=injected.outcome).inc()
        patch = jsonpatch.make_patch(dict(pod), injected.pod).patch
        meta = pod.get("metadata") or {}
        logger.info(
            "pod %s/%s %s (%s): %s", namespace, meta.get("name") or meta.get("generateName"),
            injected.outcome, self._cluster_label(injected.pod), injected.message or "-",
        )  # fmt: skip
        warning = "" if injected.outcome == INJECTED else f"lmcache: {injected.message}"
        return _response(uid, patch, warning)

    @staticmethod
    def _cluster_label(pod: Mapping[str, Any]) -> str:
        return str(((pod.get("metadata") or {}).get("labels") or {}).get(CLUSTER_LABEL, ""))

    async def _wire(self, pod: Mapping[str, Any], namespace: str, webhook: str | None) -> Any:
        cluster = self._cluster_label(pod)
        try:
            if not cluster and webhook == WEBHOOK_NAMESPACES:
                cluster = await self.lookups.namespace_cluster(namespace)
            if not cluster:
                return None  # not opted in (a label removed meanwhile): nothing to do
            conn, problem = await self.lookups.connection(namespace, cluster)
        except KubeError as exc:
            what = "may not read" if exc.status == 403 else "could not read"
            return failed(pod, cluster, f"the operator {what} the cluster's connection: {exc}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return failed(pod, cluster, f"the API server did not answer the operator: {exc}")
        if conn is None:
            return failed(pod, cluster, problem)
        return inject(pod, conn)


def needs_report(pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    if meta.get("deletionTimestamp") or REPORTED_ANNOTATION in annotations:
        return False
    if (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") == MANAGED_BY:
        return False
    return annotations.get(INJECTION_ANNOTATION) != INJECTED


def report_message(pod: Mapping[str, Any]) -> tuple[str, str]:
    """(reason, message) of the Event about a pod that is not fully wired."""
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    outcome = annotations.get(INJECTION_ANNOTATION)
    cluster = (meta.get("labels") or {}).get(CLUSTER_LABEL, "")
    if outcome in (PARTIAL, FAILED):
        what = "partly wired" if outcome == PARTIAL else "not wired"
        text = f"{what} to LMCacheCluster {cluster!r}: {annotations.get(MESSAGE_ANNOTATION, '')}"
        return REASONS[outcome], text
    return REASONS[None], (
        f"labelled {CLUSTER_LABEL}={cluster} but not wired to the cache: the injection webhook "
        "did not see it (not installed, unreachable, or the pod predates it; failurePolicy "
        "Ignore let it start without the cache). Delete the pod to have it created again"
    )


class InjectionReporter:
    """The leader's watch of labelled pods: one Event per pod the webhook could not wire."""

    def __init__(self, client: KubeClient, metrics: OperatorMetrics) -> None:
        self.client = client
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.queue = WorkQueue("injection-report", self.report, depth=metrics.queue_depth)

    def on_pod(self, event: str, pod: dict[str, Any]) -> None:
        if event in ("SYNCED", "BOOKMARK"):
            return
        meta = pod["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        if event == "DELETED" or not needs_report(pod):
            self.pods.pop(key, None)
            return
        self.pods[key] = pod
        self.queue.request(key)

    async def report(self, key: tuple[str, str]) -> None:
        pod = self.pods.pop(key, None)
        if pod is None:
            return
        reason, message = report_message(pod)
        stamp = now_rfc3339()
        involved = {"apiVersion": "v1", "kind": "Pod", "metadata": pod["metadata"]}
        try:
            await post_event(self.client, involved, reason=reason, message=message, now=stamp)
            await self.client.merge_patch(
                "v1", "Pod", key[0], key[1],
                {"metadata": {"annotations": {REPORTED_ANNOTATION: stamp}}},
            )  # fmt: skip
        except KubeError as exc:
            if exc.status == 404:
                return  # gone meanwhile
            raise
        logger.warning("pod %s/%s: %s", key[0], key[1], message)
