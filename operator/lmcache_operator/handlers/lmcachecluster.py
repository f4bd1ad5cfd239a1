"""kopf handlers of LMCacheCluster: thin wiring around the builders and the status function.

Reconcile (create/update/resume): build the children, add ownerReferences, server-side
apply. Status: computed from watch events of the cluster (kopf) and of its DaemonSet, its
pods and the nodes (our label-selected watch loops, watchers.py), written when it changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import aiohttp
import kopf
from pydantic import ValidationError

from lmcache_operator.api.common import API_VERSION, GROUP, VERSION
from lmcache_operator.api.lmcachecluster import KIND, PLURAL, LMCacheClusterSpec
from lmcache_operator.builders.common import CLUSTER_LABEL, MANAGED_BY, owner_reference
from lmcache_operator.builders.lmcachecluster import (
    APP_NAME,
    SERVICE_MONITOR_API,
    build_children,
    daemonset_name,
    name_problems,
)
from lmcache_operator.kube import FORBIDDEN_RETRY_S, KubeClient, KubeError, forbidden_message
from lmcache_operator.podfailures import container_failures
from lmcache_operator.state import REGISTRY, Applied, ClusterView, Key, forget_unseen, owner_key
from lmcache_operator.status import Observed, compute_status, same_status
from lmcache_operator.validation import describe_validation_error
from lmcache_operator.watchers import WatchLoop

logger = logging.getLogger(__name__)

SERVICE_MONITOR_CRD = "servicemonitors.monitoring.coreos.com"
CRD_CACHE_SECONDS = 60.0
DEFER_SAME_PHASE_S = 0.25
DAEMONSET_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY},app.kubernetes.io/name={APP_NAME}"
POD_SELECTOR = f"app.kubernetes.io/name={APP_NAME},{CLUSTER_LABEL}"


class Context:
    """The API client and a small cache of which optional CRDs exist."""

    client: KubeClient | None = None
    namespaces: tuple[str, ...] = ()  # watched namespaces; empty: all
    watch_tasks: list[asyncio.Task[None]] = []  # noqa: RUF012 - process-wide
    crd_seen: dict[str, tuple[bool, float]] = {}  # noqa: RUF012 - process-wide cache

    @classmethod
    def api(cls) -> KubeClient:
        if cls.client is None:
            cls.client = KubeClient.from_environment()
        return cls.client

    @classmethod
    async def crd_exists(cls, name: str) -> bool:
        cached = cls.crd_seen.get(name)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        found = (
            await cls.api().get("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, name)
            is not None
        )
        cls.crd_seen[name] = (found, time.monotonic() + CRD_CACHE_SECONDS)
        return found


@kopf.on.cleanup()
async def close_client(**_: Any) -> None:
    for task in Context.watch_tasks:
        task.cancel()
    await asyncio.gather(*Context.watch_tasks, return_exceptions=True)
    Context.watch_tasks.clear()
    if Context.client is not None:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(Context.client.requests.items()))
        logger.info("API requests made by the handlers and watches: %s", counts or "none")
        await Context.client.close()
        Context.client = None


def validate(name: str, spec: Mapping[str, Any]) -> tuple[LMCacheClusterSpec | None, list[str]]:
    """The spec model, or the problems that make it invalid (each names the field)."""
    try:
        model = LMCacheClusterSpec.model_validate(dict(spec))
    except ValidationError as exc:
        return None, describe_validation_error(exc, prefix="spec")
    problems = name_problems(name) + model.semantic_problems()
    return (None if problems else model), problems


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, KubeError):
        return exc.status in (409, 429) or exc.status >= 500
    return isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError)


async def _monitoring(
    client: KubeClient, name: str, namespace: str, wanted: bool
) -> tuple[bool, dict[str, str] | None]:
    """(create the ServiceMonitor?, condition to report)."""
    exists = await Context.crd_exists(SERVICE_MONITOR_CRD)
    if not wanted:
        if exists:  # switched off: remove one left from before
            await client.delete(
                SERVICE_MONITOR_API, "ServiceMonitor", namespace, daemonset_name(name)
            )
        return False, None
    if not exists:
        return False, {
            "type": "ServiceMonitorReady",
            "status": "False",
            "reason": "CRDNotInstalled",
            "message": f"CRD {SERVICE_MONITOR_CRD} is not installed: install the Prometheus "
            "Operator or set monitoring.serviceMonitor: false",
        }
    return True, {
        "type": "ServiceMonitorReady",
        "status": "True",
        "reason": "Created",
        "message": "ServiceMonitor applied",
    }


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile(
    body: kopf.Body,
    spec: kopf.Spec,
    name: str,
    namespace: str | None,
    meta: kopf.Meta,
    **_: Any,
) -> None:
    namespace = namespace or "default"  # the kind is namespaced; kopf types it optional
    key: Key = (namespace, name)
    generation = int(meta.get("generation", 0))
    view = REGISTRY.view(key)
    if view.body is None:
        view.body = _snapshot(body)
    model, problems = validate(name, spec)
    if model is None:
        message = "; ".join(problems)
        view.applied = Applied(generation=generation, daemonset_generation=0, problems=problems)
        REGISTRY.request_refresh(key)
        kopf.warn(body, reason="InvalidSpec", message=message)
        raise kopf.PermanentError(f"invalid spec: {message}")
    client = Context.api()
    try:
        with_monitor, monitor_condition = await _monitoring(
            client, name, namespace, model.monitoring.service_monitor
        )
        children = build_children(name, namespace, model, service_monitor=with_monitor)
        owner = {"apiVersion": API_VERSION, "kind": KIND, "metadata": dict(meta)}
        for child in children:
            child["metadata"]["ownerReferences"] = [owner_reference(owner)]
        results = await asyncio.gather(*(client.apply(child) for child in children))
    except KubeError as exc:
        forbidden = forbidden_message(exc)
        if forbidden is not None:  # the operator's RBAC, not the spec: retry, never give up
            previous = view.applied
            view.applied = (
                replace(previous, forbidden=forbidden)
                if previous is not None and not previous.problems
                else Applied(generation=generation, daemonset_generation=0, forbidden=forbidden)
            )
            REGISTRY.request_refresh(key)
            kopf.warn(body, reason="Forbidden", message=forbidden)
            raise kopf.TemporaryError(forbidden, delay=FORBIDDEN_RETRY_S) from exc
        if _transient(exc):
            raise kopf.TemporaryError(str(exc), delay=2) from exc
        problems = [f"the API server refused a generated object: {exc}"]
        view.applied = Applied(generation=generation, daemonset_generation=0, problems=problems)
        REGISTRY.request_refresh(key)
        kopf.warn(body, reason="InvalidSpec", message=problems[0])
        raise kopf.PermanentError(problems[0]) from exc
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise kopf.TemporaryError(f"API server unreachable: {exc}", delay=2) from exc
    ds_generation = next(
        int(r["metadata"].get("generation", 0)) for r in results if r["kind"] == "DaemonSet"
    )
    view.applied = Applied(
        generation=generation,
        daemonset_generation=ds_generation,
        monitoring_condition=monitor_condition,
    )
    REGISTRY.request_refresh(key)


def _snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """What status needs of the body; no deep copy: kopf replaces, never edits, raw bodies."""
    meta = body["metadata"]
    return {
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "generation") if k in meta},
        "spec": body.get("spec", {}),
        "status": body.get("status") or {},
    }


@kopf.on.event(GROUP, VERSION, PLURAL)
async def cluster_event(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
    key: Key = (body["metadata"]["namespace"], body["metadata"]["name"])
    if event.get("type") == "DELETED":
        REGISTRY.forget(key)
        return
    REGISTRY.view(key).body = _snapshot(body)
    REGISTRY.request_refresh(key)


def on_daemonset(event: str, obj: dict[str, Any]) -> None:
    if event == "SYNCED":
        return
    key = owner_key(obj, CLUSTER_LABEL)
    if key is None:
        return
    view = REGISTRY.view(key)
    view.daemonset = None if event == "DELETED" else obj
    REGISTRY.prune(key)
    REGISTRY.request_refresh(key)


def _pod_summary(body: Mapping[str, Any]) -> dict[str, Any]:
    status = body.get("status", {})
    return {
        "metadata": {
            "name": body["metadata"]["name"],
            "deletionTimestamp": body["metadata"].get("deletionTimestamp"),
        },
        "spec": {"nodeName": body.get("spec", {}).get("nodeName")},
        "status": {
            "phase": status.get("phase"),
            "hostIP": status.get("hostIP", ""),
            "conditions": status.get("conditions") or [],
            "containerStatuses": [
                {"restartCount": s.get("restartCount", 0)}
                for s in status.get("containerStatuses") or []
            ],
        },
        "failures": container_failures(status),
    }


def on_pod(event: str, obj: dict[str, Any]) -> None:
    if event == "SYNCED":  # after a (re)list: forget pods deleted while we were not watching
        for changed in forget_unseen(((k, v.pods) for k, v in REGISTRY.views.items()), obj):
            REGISTRY.request_refresh(changed)
        return
    meta = obj["metadata"]
    key = owner_key(obj, CLUSTER_LABEL)
    if key is None:
        return
    view = REGISTRY.view(key)
    if event == "DELETED":
        view.pods.pop(meta["name"], None)
        REGISTRY.prune(key)
    else:
        view.pods[meta["name"]] = _pod_summary(obj)
    REGISTRY.request_refresh(key)


def on_node(event: str, obj: dict[str, Any]) -> None:
    """A node that goes away or stops being Ready makes its cache endpoint not ready at once."""
    if event == "SYNCED":
        seen_nodes = {name for _, name in obj["seen"]}
        changed = [n for n in REGISTRY.node_problems if n not in seen_nodes]
        for name in changed:
            REGISTRY.node_problems[name] = "deleted"
        return
    name = obj["metadata"]["name"]
    problem: str | None = None
    if event == "DELETED":
        problem = "deleted"
    else:
        for condition in obj.get("status", {}).get("conditions") or []:
            if condition.get("type") == "Ready" and condition.get("status") != "True":
                problem = "NotReady"
    if REGISTRY.node_problems.get(name) == problem:
        return
    if problem is None:
        REGISTRY.node_problems.pop(name, None)
    else:
        REGISTRY.node_problems[name] = problem
    for key, view in list(REGISTRY.views.items()):
        if any(p["spec"].get("nodeName") == name for p in view.pods.values()):
            REGISTRY.request_refresh(key)


@kopf.on.startup()
async def start_watches(**_: Any) -> None:
    client = Context.api()
    namespaces: list[str | None] = list(Context.namespaces) or [None]
    loops = [WatchLoop(client, "v1", "Node", on_node)]
    for namespace in namespaces:
        loops.append(
            WatchLoop(
                client,
                "apps/v1",
                "DaemonSet",
                on_daemonset,
                namespace=namespace,
                label_selector=DAEMONSET_SELECTOR,
            )
        )
        loops.append(
            WatchLoop(client, "v1", "Pod", on_pod, namespace=namespace, label_selector=POD_SELECTOR)
        )
    for loop in loops:
        task = asyncio.get_running_loop().create_task(loop.run(), name=repr(loop))
        Context.watch_tasks.append(task)


def _defer(key: Key, view: ClusterView, status: Mapping[str, Any]) -> bool:
    """Hold back a write that keeps the phase, so a burst of pod events costs one write.

    Phase changes (Ready, Degraded, ...) are written at once; counts and endpoints that move
    within one phase are written at most every DEFER_SAME_PHASE_S.
    """
    before = view.last_written or (view.body or {}).get("status") or {}
    same_phase = before.get("phase") == status["phase"] and before.get(
        "observedGeneration"
    ) == status.get("observedGeneration")
    if not same_phase:
        view.defer_until = None
        return False
    loop = asyncio.get_running_loop()
    if view.defer_until is None:
        view.defer_until = loop.time() + DEFER_SAME_PHASE_S
        loop.call_later(DEFER_SAME_PHASE_S, REGISTRY.request_refresh, key)
        return True
    if loop.time() < view.defer_until:
        return True
    view.defer_until = None
    return False


async def refresh_status(key: Key, view: ClusterView) -> None:
    """Compute the status from the views and write it when it changed."""
    body = view.body
    applied = view.applied
    if body is None or applied is None:
        return  # not reconciled by this process yet: keep the status as it is
    spec = body.get("spec", {})
    server = spec.get("server", {})
    placement = spec.get("placement", {})
    observed = Observed(
        generation=int(body["metadata"].get("generation", 0)),
        applied_generation=applied.generation,
        min_daemonset_generation=applied.daemonset_generation,
        problems=applied.problems,
        port=int(server.get("port", 5555)),
        node_selector=placement.get("nodeSelector", {}),
        daemonset=view.daemonset,
        pods=list(view.pods.values()),
        previous=body.get("status") or {},
        monitoring_condition=applied.monitoring_condition,
        node_problems=REGISTRY.node_problems,
        forbidden=applied.forbidden,
    )
    status = compute_status(observed)
    from lmcache_operator.handlers.vllmdeployment import consumers_of  # noqa: PLC0415 - cycle

    status["consumers"] = consumers_of(*key)
    if same_status(status, observed.previous) or (
        view.last_written is not None and same_status(status, view.last_written)
    ):
        return
    if _defer(key, view, status):
        return
    try:
        await Context.api().patch_status(API_VERSION, KIND, key[0], key[1], status)
    except KubeError as exc:
        if exc.status == 404:
            return  # deleted meanwhile
        raise
    view.last_written = status
    logger.debug("status of %s/%s: %s", key[0], key[1], status["phase"])


REGISTRY.refresh = refresh_status
