"""kopf handlers of VLLMDeployment: thin wiring around the vLLM builders and status function.

Reconcile (create/update/resume, and when the referenced LMCacheCluster appears or changes):
resolve the cluster's connection settings, build the Service and Deployment, server-side
apply. Watches of the VLLMDeployment, its Deployment and pods, the LMCacheCluster and its
cache pods keep in-memory views; the status is computed from them. Pods of a Deployment with
colocateWithCache=Required start scheduling-gated: the operator narrows each one's node
affinity to the nodes whose cache pod is Ready and then lifts the gate.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import kopf
from pydantic import ValidationError

from lmcache_operator.api.common import API_VERSION, GROUP, VERSION
from lmcache_operator.api.lmcachecluster import KIND as CLUSTER_KIND
from lmcache_operator.api.lmcachecluster import PLURAL as CLUSTER_PLURAL
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.api.vllmdeployment import KIND, PLURAL, VLLMDeploymentSpec
from lmcache_operator.builders.common import CLUSTER_LABEL, MANAGED_BY, owner_reference
from lmcache_operator.builders.lmcachecluster import APP_NAME as CACHE_APP_NAME
from lmcache_operator.builders.lmcachecluster import name_problems as cluster_name_problems
from lmcache_operator.builders.vllm_connector import (
    HOSTNAME_LABEL,
    SCHEDULING_GATE,
    CacheConnection,
    compatibility_problems,
)
from lmcache_operator.builders.vllm_status import (
    CACHE_NODES_ANNOTATION,
    VLLMObserved,
    compute_status,
    pod_summary,
    ready_cache_nodes,
)
from lmcache_operator.builders.vllmdeployment import (
    APP_NAME,
    DEPLOYMENT_LABEL,
    build_children,
    name_problems,
    selector_string,
    service_url,
)
from lmcache_operator.handlers.lmcachecluster import Context
from lmcache_operator.kube import FORBIDDEN_RETRY_S, KubeError, forbidden_message, object_path
from lmcache_operator.state import REGISTRY, Key, forget_unseen, owner_key
from lmcache_operator.validation import describe_validation_error
from lmcache_operator.watchers import WatchLoop

logger = logging.getLogger(__name__)

RETRY_DELAY_S = 2.0


@dataclass
class Applied:
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
    applied: Applied | None = None
    last_written: dict[str, Any] | None = None


@dataclass
class CacheView:
    """What a consumer needs to know about one LMCacheCluster."""

    body: dict[str, Any] | None = None
    generation: int | None = None
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    ready_nodes: frozenset[str] = frozenset()


VIEWS: dict[Key, VLLMView] = {}
CLUSTERS: dict[Key, CacheView] = {}


class Retry(Exception):  # noqa: N818 - a signal, not an error
    """The object changed under us (409): try again shortly, without a traceback."""


class Coalescer:
    """Runs ``action(key)`` one at a time per key; requests while one is queued collapse."""

    def __init__(self, name: str, action: Callable[[Key], Awaitable[None]]) -> None:
        self.name = name
        self.action = action
        self._locks: dict[Key, asyncio.Lock] = {}
        self._queued: set[Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, key: Key) -> None:
        if key in self._queued:
            return
        self._queued.add(key)
        task = asyncio.get_running_loop().create_task(self._run(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: Key) -> None:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            self._queued.discard(key)
            try:
                await self.action(key)
            except Retry as exc:
                logger.debug("%s of %s/%s: %s; again in %s s", self.name, *key, exc, RETRY_DELAY_S)
                asyncio.get_running_loop().call_later(RETRY_DELAY_S, self.request, key)
            except Exception:
                logger.exception(
                    "%s of %s/%s failed; retrying in %s s", self.name, *key, RETRY_DELAY_S
                )
                asyncio.get_running_loop().call_later(RETRY_DELAY_S, self.request, key)


def _snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy({k: body[k] for k in ("metadata", "spec", "status") if k in body})


def validate(name: str, spec: Mapping[str, Any]) -> tuple[VLLMDeploymentSpec | None, list[str]]:
    """The spec model, or the problems that make it invalid (each names the field)."""
    try:
        model = VLLMDeploymentSpec.model_validate(dict(spec))
    except ValidationError as exc:
        return None, describe_validation_error(exc, prefix="spec")
    problems = name_problems(name)
    return (None if problems else model), problems


def connection(namespace: str, cluster: str) -> tuple[CacheConnection | None, str]:
    """The cluster's connection settings, or why there are none ('' when it does not exist)."""
    view = CLUSTERS.get((namespace, cluster))
    if view is None or view.body is None:
        return None, ""
    try:
        spec = LMCacheClusterSpec.model_validate(view.body.get("spec") or {})
    except ValidationError as exc:
        problems = describe_validation_error(exc, prefix="spec")
        return None, f"LMCacheCluster {cluster!r} has an invalid spec: {'; '.join(problems)}"
    problems = cluster_name_problems(cluster) + spec.semantic_problems()
    if problems:
        return None, f"LMCacheCluster {cluster!r} has an invalid spec: {'; '.join(problems)}"
    return CacheConnection.from_cluster(cluster, spec), ""


def _cluster_ref(body: Mapping[str, Any] | None) -> str | None:
    cache = ((body or {}).get("spec") or {}).get("cache") or {}
    if cache.get("enabled", True) is False:
        return None
    ref = (cache.get("clusterRef") or {}).get("name")
    return str(ref) if ref else None


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, KubeError):
        return exc.status in (409, 429) or exc.status >= 500
    return isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError)


async def _load_cluster(namespace: str, cluster: str) -> None:
    """Fill the cluster view from the API server when its watch event has not arrived yet."""
    view = CLUSTERS.setdefault((namespace, cluster), CacheView())
    if view.body is not None:
        return
    body = await Context.api().get(API_VERSION, CLUSTER_KIND, namespace, cluster)
    if body is not None and view.body is None:
        view.body = _snapshot(body)
        view.generation = int(body["metadata"].get("generation", 0))


async def apply_children(key: Key) -> None:
    """Build and apply the Service and Deployment from the current spec and cluster."""
    view = VIEWS.get(key)
    if view is None or view.body is None:
        return
    namespace, name = key
    meta = view.body["metadata"]
    generation = int(meta.get("generation", 0))
    model, problems = validate(name, view.body.get("spec") or {})
    if model is None:
        view.applied = Applied(generation=generation, problems=problems)
        STATUS.request(key)
        raise kopf.PermanentError(f"invalid spec: {'; '.join(problems)}")
    conn: CacheConnection | None = None
    client = Context.api()
    if model.cache.enabled and model.cache.cluster_ref is not None:
        await _load_cluster(namespace, model.cache.cluster_ref.name)
        conn, _ = connection(namespace, model.cache.cluster_ref.name)
        if conn is None:  # missing or invalid: keep what runs, follow replicas only
            if view.deployment is not None:
                try:
                    await client.request(
                        "PATCH",
                        object_path("apps/v1", "Deployment", namespace, name),
                        body={"spec": {"replicas": model.replicas}},
                        content_type="application/merge-patch+json",
                    )
                except KubeError as exc:
                    if exc.status != 404:  # gone meanwhile: nothing to scale
                        raise
            if view.applied is None or view.applied.problems:
                view.applied = Applied(generation=None)  # nothing applied yet: status says why
            STATUS.request(key)
            return
    children = build_children(name, namespace, model, conn)
    owner = {"apiVersion": API_VERSION, "kind": KIND, "metadata": dict(meta)}
    for child in children:
        child["metadata"]["ownerReferences"] = [owner_reference(owner)]
    results = [await client.apply(child) for child in children]
    deployment_generation = int(results[-1]["metadata"].get("generation", 0))
    view.applied = Applied(generation=generation, deployment_generation=deployment_generation)
    STATUS.request(key)


def _record_refusal(key: Key, generation: int, exc: KubeError) -> str:
    """A generated object the API server refuses is a spec problem, not something to retry."""
    message = f"the API server refused a generated object: {exc}"
    view = VIEWS.setdefault(key, VLLMView())
    view.applied = Applied(generation=generation, problems=[message])
    STATUS.request(key)
    return message


def _record_forbidden(key: Key, message: str) -> None:
    """RBAC refused an apply: status says Forbidden; what was applied before stays."""
    view = VIEWS.setdefault(key, VLLMView())
    previous = view.applied
    view.applied = (
        replace(previous, forbidden=message)
        if previous is not None and not previous.problems
        else Applied(generation=None, forbidden=message)
    )
    STATUS.request(key)


async def _apply_in_background(key: Key) -> None:
    """Re-apply after the LMCacheCluster changed (outside kopf's handler retries)."""
    try:
        await apply_children(key)
    except kopf.PermanentError as exc:
        logger.warning("%s/%s: %s", key[0], key[1], exc)
    except KubeError as exc:
        forbidden = forbidden_message(exc)
        if forbidden is not None:
            logger.warning("%s/%s: %s", key[0], key[1], forbidden)
            _record_forbidden(key, forbidden)
            asyncio.get_running_loop().call_later(FORBIDDEN_RETRY_S, APPLY.request, key)
            return
        if _transient(exc):
            raise  # the coalescer retries
        body = VIEWS.get(key, VLLMView()).body or {}
        generation = int(body.get("metadata", {}).get("generation", 0))
        logger.warning("%s/%s: %s", key[0], key[1], _record_refusal(key, generation, exc))


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile(body: kopf.Body, name: str, namespace: str | None, **_: Any) -> None:
    key: Key = (namespace or "default", name)
    view = VIEWS.setdefault(key, VLLMView())
    view.body = _snapshot(body)
    try:
        await apply_children(key)
    except kopf.PermanentError as exc:
        kopf.warn(body, reason="InvalidSpec", message=str(exc))
        raise
    except KubeError as exc:
        forbidden = forbidden_message(exc)
        if forbidden is not None:  # the operator's RBAC, not the spec: retry, never give up
            _record_forbidden(key, forbidden)
            kopf.warn(body, reason="Forbidden", message=forbidden)
            raise kopf.TemporaryError(forbidden, delay=FORBIDDEN_RETRY_S) from exc
        if _transient(exc):
            raise kopf.TemporaryError(str(exc), delay=2) from exc
        message = _record_refusal(key, int(body["metadata"].get("generation", 0)), exc)
        kopf.warn(body, reason="InvalidSpec", message=message)
        raise kopf.PermanentError(message) from exc
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise kopf.TemporaryError(f"API server unreachable: {exc}", delay=2) from exc


@kopf.on.event(GROUP, VERSION, PLURAL)
async def vllm_event(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
    key: Key = (body["metadata"]["namespace"], body["metadata"]["name"])
    if event.get("type") == "DELETED":
        VIEWS.pop(key, None)
        _refresh_cluster_consumers(key[0])
        return
    view = VIEWS.setdefault(key, VLLMView())
    before = _cluster_ref(view.body) if view.body is not None else ""
    view.body = _snapshot(body)
    cluster = _cluster_ref(view.body)
    if cluster != before:
        _refresh_cluster_consumers(key[0])
    if cluster is not None and any(_waiting(p) for p in view.pods.values()):
        GATES.request((key[0], cluster))  # e.g. after a restart, pods seen before their owner
    STATUS.request(key)


DEPLOYMENT_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY},app.kubernetes.io/name={APP_NAME}"
VLLM_POD_SELECTOR = f"app.kubernetes.io/name={APP_NAME},{DEPLOYMENT_LABEL}"
CACHE_POD_SELECTOR = f"app.kubernetes.io/name={CACHE_APP_NAME},{CLUSTER_LABEL}"


def on_deployment(event: str, obj: dict[str, Any]) -> None:
    if event == "SYNCED":
        return
    key = owner_key(obj, DEPLOYMENT_LABEL)
    if key is None:
        return
    view = VIEWS.setdefault(key, VLLMView())
    view.deployment = None if event == "DELETED" else obj
    _forget_if_gone(key)
    STATUS.request(key)


def _forget_if_gone(key: Key) -> None:
    """Drop the view of a deleted VLLMDeployment once its last child event has passed."""
    view = VIEWS.get(key)
    if view is not None and view.body is None and view.deployment is None and not view.pods:
        del VIEWS[key]


def on_vllm_pod(event: str, obj: dict[str, Any]) -> None:
    if event == "SYNCED":
        for changed in forget_unseen(((k, v.pods) for k, v in VIEWS.items()), obj):
            STATUS.request(changed)
        return
    meta = obj["metadata"]
    key = owner_key(obj, DEPLOYMENT_LABEL)
    if key is None:
        return
    view = VIEWS.setdefault(key, VLLMView())
    if event == "DELETED":
        view.pods.pop(meta["name"], None)
        _forget_if_gone(key)
    else:
        summary = pod_summary(obj)
        view.pods[meta["name"]] = summary
        cluster = _cluster_ref(view.body)
        if _waiting(summary) and cluster is not None:
            GATES.request((key[0], cluster))
    STATUS.request(key)


def _waiting(summary: Mapping[str, Any]) -> bool:
    """Gated, or ungated by us but not scheduled yet (its node list may need refreshing)."""
    spec = summary["spec"]
    return bool(spec["gated"] or (spec["cacheNodes"] is not None and not spec["nodeName"]))


def on_cache_pod(event: str, obj: dict[str, Any]) -> None:
    if event == "SYNCED":
        changed = forget_unseen(((k, v.pods) for k, v in CLUSTERS.items()), obj)
    else:
        meta = obj["metadata"]
        cluster_key = owner_key(obj, CLUSTER_LABEL)
        if cluster_key is None:
            return
        view = CLUSTERS.setdefault(cluster_key, CacheView())
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
        view = CLUSTERS[key]
        ready = ready_cache_nodes(list(view.pods.values()))
        if ready == view.ready_nodes:
            continue
        view.ready_nodes = ready
        for consumer in _consumers(*key):
            STATUS.request(consumer)
        GATES.request(key)


@kopf.on.startup()
async def start_vllm_watches(**_: Any) -> None:
    client = Context.api()
    namespaces: list[str | None] = list(Context.namespaces) or [None]
    for namespace in namespaces:
        for api_version, kind, callback, selector in (
            ("apps/v1", "Deployment", on_deployment, DEPLOYMENT_SELECTOR),
            ("v1", "Pod", on_vllm_pod, VLLM_POD_SELECTOR),
            ("v1", "Pod", on_cache_pod, CACHE_POD_SELECTOR),
        ):
            loop = WatchLoop(
                client, api_version, kind, callback, namespace=namespace, label_selector=selector
            )
            task = asyncio.get_running_loop().create_task(loop.run(), name=repr(loop))
            Context.watch_tasks.append(task)


def _consumers(namespace: str, cluster: str) -> list[Key]:
    return [k for k, v in VIEWS.items() if k[0] == namespace and _cluster_ref(v.body) == cluster]


def consumers_of(namespace: str, cluster: str) -> list[str]:
    """Names of the VLLMDeployments that use an LMCacheCluster (for its status)."""
    return sorted(k[1] for k in _consumers(namespace, cluster))


def _refresh_cluster_consumers(namespace: str) -> None:
    """The consumer lists of this namespace's LMCacheClusters may have changed."""
    for key in list(REGISTRY.views):
        if key[0] == namespace:
            REGISTRY.request_refresh(key)


@kopf.on.event(GROUP, VERSION, CLUSTER_PLURAL)
async def cache_cluster_event(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
    key: Key = (body["metadata"]["namespace"], body["metadata"]["name"])
    view = CLUSTERS.setdefault(key, CacheView())
    if event.get("type") == "DELETED":
        view.body, view.generation = None, None
        changed = True
    else:
        generation = int(body["metadata"].get("generation", 0))
        changed = view.body is None or view.generation != generation
        view.body, view.generation = _snapshot(body), generation
    if not changed:
        return
    for consumer in _consumers(*key):
        if event.get("type") != "DELETED":
            APPLY.request(consumer)  # new connection settings roll the pods (config hash)
        STATUS.request(consumer)
    GATES.request(key)


# ---- scheduling gates ---------------------------------------------------------------------


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


async def lift_gates(cluster_key: Key) -> None:
    """Place every gated consumer pod on a node whose cache pod is Ready, then ungate it."""
    namespace, cluster = cluster_key
    cluster_view = CLUSTERS.get(cluster_key, CacheView())
    ready = sorted(cluster_view.ready_nodes)
    if not ready or cluster_view.body is None:
        return  # pods stay gated (Pending, SchedulingGated) until a cache pod is Ready
    client = Context.api()
    for consumer in _consumers(namespace, cluster):
        view = VIEWS[consumer]
        for pod_name, summary in list(view.pods.items()):
            if summary["metadata"].get("deletionTimestamp"):
                continue
            if summary["spec"]["gated"]:
                await _ungate(client, namespace, pod_name, ready)
            elif _stale_placement(summary, ready):
                await _restart_unscheduled(client, namespace, pod_name)


def _stale_placement(summary: Mapping[str, Any], ready: list[str]) -> bool:
    """An ungated pod still unscheduled whose node list lacks a node that is ready now."""
    allowed = summary["spec"].get("cacheNodes")
    if allowed is None or summary["spec"].get("nodeName"):
        return False
    return bool(set(ready) - set(allowed.split(",")))


async def _restart_unscheduled(client: Any, namespace: str, pod_name: str) -> None:
    """Delete it: its ReplicaSet creates a gated replacement, placed on today's ready nodes."""
    pod = await client.get("v1", "Pod", namespace, pod_name)
    if pod is None or pod["spec"].get("nodeName"):
        return
    try:
        await client.request(
            "DELETE",
            object_path("v1", "Pod", namespace, pod_name),
            body={"preconditions": {"resourceVersion": pod["metadata"]["resourceVersion"]}},
        )
    except KubeError as exc:
        if exc.status == 404:
            return
        if exc.status == 409:
            raise Retry(f"pod {pod_name} changed meanwhile") from exc
        raise
    logger.info("pod %s/%s restarted: more nodes have a ready cache now", namespace, pod_name)


async def _ungate(client: Any, namespace: str, pod_name: str, nodes: list[str]) -> None:
    path = object_path("v1", "Pod", namespace, pod_name)
    pod = await client.get("v1", "Pod", namespace, pod_name)
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
    try:
        await client.request("PATCH", path, body=patch, content_type="application/merge-patch+json")
        rest = [g for g in gates if g.get("name") != SCHEDULING_GATE]
        await client.request(
            "PATCH",
            path,
            body={"spec": {"schedulingGates": rest or None}},
            content_type="application/merge-patch+json",
        )
    except KubeError as exc:
        if exc.status == 404:
            return
        if exc.status == 409:
            raise Retry(f"pod {pod_name} changed meanwhile") from exc
        logger.warning("cannot ungate pod %s/%s: %s", namespace, pod_name, exc)
        return
    logger.info("pod %s/%s may run on %s", namespace, pod_name, ", ".join(nodes))


# ---- status -----------------------------------------------------------------------------------


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def same_status(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    def strip(status: Mapping[str, Any]) -> Any:
        out = dict(_without_none(dict(status)))
        out["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"}
            for c in out.get("conditions") or []
        ]
        return out

    return bool(strip(a) == strip(b))


def observe(key: Key, view: VLLMView) -> VLLMObserved | None:
    body = view.body
    if body is None or view.applied is None:
        return None  # not reconciled by this process yet: keep the status as it is
    namespace, name = key
    spec = body.get("spec") or {}
    model, _ = validate(name, spec)
    cluster = _cluster_ref(body)
    conn, cluster_problem = connection(namespace, cluster) if cluster else (None, "")
    cache_view = CLUSTERS.get((namespace, cluster)) if cluster else None
    compat = compatibility_problems(model, conn) if model is not None and conn else []
    applied = view.applied
    return VLLMObserved(
        generation=int(body["metadata"].get("generation", 0)),
        desired_replicas=int(spec.get("replicas", 1)),
        applied_generation=applied.generation if not applied.problems else None,
        min_deployment_generation=applied.deployment_generation,
        problems=applied.problems,
        cache_enabled=cluster is not None,
        cluster_ref=cluster or "",
        cluster_found=cache_view is not None and cache_view.body is not None,
        cluster_problem=cluster_problem,
        compat_problems=compat,
        ready_cache_nodes=cache_view.ready_nodes if cache_view else frozenset(),
        deployment=view.deployment,
        pods=list(view.pods.values()),
        previous=body.get("status") or {},
        url=service_url(name, namespace, model) if model is not None else "",
        selector=selector_string(name),
        forbidden=applied.forbidden,
    )


async def refresh_status(key: Key) -> None:
    view = VIEWS.get(key)
    if view is None:
        return
    observed = observe(key, view)
    if observed is None:
        return
    status = compute_status(observed)
    if same_status(status, observed.previous) or (
        view.last_written is not None and same_status(status, view.last_written)
    ):
        return
    if status["cache"].get("compatible") is None:
        status["cache"]["compatible"] = None  # merge patch: remove a stale value
    try:
        await Context.api().patch_status(API_VERSION, KIND, key[0], key[1], status)
    except KubeError as exc:
        if exc.status == 404:
            return
        raise
    view.last_written = status


STATUS = Coalescer("status refresh", refresh_status)
APPLY = Coalescer("re-apply", _apply_in_background)
GATES = Coalescer("scheduling-gate lift", lift_gates)
