"""VLLMDeployment status from what the API server reports: pure, testable without a cluster."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmcache_operator.podfailures import container_failures, describe
from lmcache_operator.quantity import parse_bytes
from lmcache_operator.status import now_rfc3339, pod_ready

# Set by the operator when it lifts a pod's scheduling gate: the nodes it may run on.
CACHE_NODES_ANNOTATION = "lmcache.dev/cache-nodes"
# Set by the operator while the cache pod of the vLLM pod's node is being replaced.
CACHE_ROLLOUT_ANNOTATION = "lmcache.dev/cache-rollout"

CONDITION_TYPES = (
    "Ready",
    "Available",
    "Progressing",
    "CacheReady",
    "CacheCompatible",
    "ConfigValid",
    "ReplicaFailure",
)


@dataclass(frozen=True)
class VLLMObserved:
    """Everything the status is computed from."""

    generation: int
    desired_replicas: int
    applied_generation: int | None  # generation whose children were applied (None: not yet)
    min_deployment_generation: int  # Deployment generation our last apply produced
    problems: Sequence[str]  # invalid spec: ConfigValid=False
    cache_enabled: bool
    cluster_ref: str
    cluster_found: bool
    cluster_problem: str = ""  # the cluster exists but cannot be used (e.g. its spec is invalid)
    compat_problems: Sequence[str] = ()
    ready_cache_nodes: frozenset[str] = frozenset()
    deployment: Mapping[str, Any] | None = None
    pods: Sequence[Mapping[str, Any]] = ()
    previous: Mapping[str, Any] = field(default_factory=dict)
    url: str = ""
    router_url: str = ""  # spec.router.enabled: the router Service's URL
    selector: str = ""
    forbidden: str = ""  # RBAC refused the last apply: reason Forbidden


def pod_summary(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a vLLM pod the status needs (kept in memory per pod)."""
    meta = body.get("metadata", {})
    spec = body.get("spec", {})
    status = body.get("status", {})
    failures = container_failures(status)
    return {
        "metadata": {
            "name": meta.get("name", ""),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "cacheRollout": (meta.get("annotations") or {}).get(CACHE_ROLLOUT_ANNOTATION),
        },
        "spec": {
            "nodeName": spec.get("nodeName"),
            "gated": bool(spec.get("schedulingGates")),
            "cacheNodes": (meta.get("annotations") or {}).get(CACHE_NODES_ANNOTATION),
            "memoryRequest": memory_request(spec),
        },
        "status": {
            "phase": status.get("phase"),
            "conditions": [
                {"type": c.get("type"), "status": c.get("status")}
                for c in status.get("conditions") or []
            ],
        },
        "failures": failures,
    }


def memory_request(pod_spec: Mapping[str, Any]) -> int:
    """The pod's memory request in bytes, as the scheduler counts it: its containers' sum,
    or its largest init container's when that is more."""

    def requested(container: Mapping[str, Any]) -> int:
        value = ((container.get("resources") or {}).get("requests") or {}).get("memory")
        try:
            return parse_bytes(str(value)) if value is not None else 0
        except ValueError:
            return 0

    running = sum(requested(c) for c in pod_spec.get("containers") or [])
    init = max((requested(c) for c in pod_spec.get("initContainers") or []), default=0)
    return max(running, init)


def active_pods(pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pods neither being deleted nor finished."""
    return [
        p
        for p in pods
        if not p["metadata"].get("deletionTimestamp")
        and p["status"].get("phase") not in ("Succeeded", "Failed")
    ]


def nodes_without_ready_cache(observed: VLLMObserved) -> list[str]:
    nodes = {p["spec"]["nodeName"] for p in active_pods(observed.pods) if p["spec"].get("nodeName")}
    return sorted(nodes - observed.ready_cache_nodes)


def _deployment_counts(deployment: Mapping[str, Any] | None) -> dict[str, int]:
    status = (deployment or {}).get("status", {})
    return {
        key: int(status.get(key, 0))
        for key in ("replicas", "readyReplicas", "availableReplicas", "updatedReplicas")
    }


def _deployment_current(observed: VLLMObserved) -> bool:
    dep = observed.deployment
    if dep is None or observed.applied_generation is None:
        return False
    generation = int(dep.get("metadata", {}).get("generation", 0))
    seen = int(dep.get("status", {}).get("observedGeneration", 0))
    return generation >= observed.min_deployment_generation and seen >= generation


def _cache(observed: VLLMObserved) -> tuple[str, tuple[bool, str, str], list[str]]:
    """(state, CacheReady (status, reason, message), nodes without a ready cache pod)."""
    ref = observed.cluster_ref
    if not observed.cache_enabled:
        return "Disabled", (False, "CacheDisabled", "cache.enabled is false"), []
    if not observed.cluster_found:
        return (
            "NotFound",
            (
                False,
                "ClusterNotFound",
                f"LMCacheCluster {ref!r} does not exist in this namespace: create it or change "
                "cache.clusterRef; running replicas keep serving and recompute",
            ),
            [],
        )
    if observed.cluster_problem:
        return "Incompatible", (False, "ClusterInvalid", observed.cluster_problem), []
    missing = nodes_without_ready_cache(observed)
    gated = [p for p in active_pods(observed.pods) if p["spec"].get("gated")]
    if missing:
        return (
            "Degraded",
            (
                False,
                "NodesWithoutReadyCache",
                f"replicas on {', '.join(missing)} have no Ready cache pod of {ref!r}; they "
                "recompute until it is back",
            ),
            missing,
        )
    if not observed.ready_cache_nodes:
        return (
            "Waiting",
            (
                False,
                "NoReadyCacheServer",
                f"no cache pod of LMCacheCluster {ref!r} is Ready"
                + (f"; {len(gated)} replica(s) wait to be scheduled" if gated else ""),
            ),
            [],
        )
    message = f"every scheduled replica has a Ready cache pod of {ref!r} on its node"
    if gated:
        message += f"; {len(gated)} replica(s) wait to be scheduled on a node with one"
    return "Ready", (True, "CacheServersReady", message), []


def _replica_failure(observed: VLLMObserved) -> tuple[bool, str, str]:
    failing = sorted(
        (p for p in active_pods(observed.pods) if p.get("failures")),
        key=lambda p: str(p["metadata"]["name"]),
    )
    if failing:
        parts = [f"pod {p['metadata']['name']}: {describe(p['failures'])}" for p in failing]
        return True, str(failing[0]["failures"][0]["reason"]), "; ".join(parts)
    for condition in (observed.deployment or {}).get("status", {}).get("conditions") or []:
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            return (
                True,
                str(condition.get("reason", "ReplicaFailure")),
                condition.get("message", ""),
            )
    return False, "NoFailure", ""


def _condition(
    previous: Mapping[str, Mapping[str, Any]],
    row: tuple[str, bool | None, str, str],
    generation: int,
    now: str,
) -> dict[str, Any]:
    ctype, state, reason, message = row
    return _make_condition(previous, ctype, state, reason, message, generation=generation, now=now)


def _make_condition(
    previous: Mapping[str, Mapping[str, Any]],
    ctype: str,
    state: bool | None,
    reason: str,
    message: str,
    *,
    generation: int,
    now: str,
) -> dict[str, Any]:
    text = "Unknown" if state is None else ("True" if state else "False")
    before = previous.get(ctype)
    keep = before is not None and before.get("status") == text
    return {
        "type": ctype,
        "status": text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": before.get("lastTransitionTime", now) if keep and before else now,
        "observedGeneration": generation,
    }


def compute_status(observed: VLLMObserved, now: str | None = None) -> dict[str, Any]:
    """The whole status object (camelCase, as stored)."""
    now = now or now_rfc3339()
    counts = _deployment_counts(observed.deployment)
    desired = observed.desired_replicas
    valid = not observed.problems
    state, (cache_ok, cache_reason, cache_message), missing = _cache(observed)
    if observed.cache_enabled and observed.cluster_found and not observed.cluster_problem:
        compatible: bool | None = not observed.compat_problems
        compat = (
            compatible,
            "Compatible" if compatible else "Incompatible",
            "; ".join(observed.compat_problems)
            or "chunk size, transfer mode and KV layout match the cluster",
        )
        if not compatible:
            state = "Incompatible"
    else:
        compatible = None
        compat = (None, cache_reason, cache_message)
    current = _deployment_current(observed)
    rolled = current and counts["updatedReplicas"] >= desired and counts["replicas"] == desired
    ready = valid and not observed.forbidden and rolled and counts["readyReplicas"] >= desired
    if not valid:
        reason, message = "InvalidSpec", "; ".join(observed.problems)
    elif observed.forbidden:
        reason, message = "Forbidden", observed.forbidden
    elif observed.applied_generation is None:
        reason, message = "WaitingForCacheCluster", cache_message
    elif not rolled:
        reason = "RollingOut"
        message = f"{counts['updatedReplicas']} of {desired} replicas run the current spec"
    elif not ready:
        reason = "ReplicasNotReady"
        message = f"{counts['readyReplicas']} of {desired} replicas ready"
    else:
        reason, message = "AllReplicasReady", f"{desired} of {desired} replicas ready"
    available = counts["availableReplicas"] > 0 or (desired == 0 and current)
    failing, failure_reason, failure_message = _replica_failure(observed)
    progressing = valid and not (rolled and ready)
    rows: list[tuple[str, bool | None, str, str]] = [
        ("Ready", ready, reason, message),
        (
            "Available",
            available,
            "ReplicasAvailable" if available else "NoReplicaAvailable",
            f"{counts['availableReplicas']} replica(s) available",
        ),
        (
            "Progressing",
            progressing,
            reason if progressing else "Complete",
            message if progressing else "the current spec is rolled out",
        ),
        ("CacheReady", cache_ok, cache_reason, cache_message),
        ("CacheCompatible", *compat),
        (
            "ConfigValid",
            valid,
            "Valid" if valid else "InvalidSpec",
            "" if valid else "; ".join(observed.problems),
        ),
        ("ReplicaFailure", failing, failure_reason, failure_message),
    ]
    previous = {c["type"]: c for c in observed.previous.get("conditions") or []}
    conditions = [_condition(previous, row, observed.generation, now) for row in rows]
    applied = observed.generation if observed.problems else observed.applied_generation
    return {
        "observedGeneration": applied
        if applied is not None
        else observed.previous.get("observedGeneration"),
        **counts,
        "selector": observed.selector,
        "url": observed.url,
        "routerUrl": observed.router_url,
        "cache": {
            "clusterRef": observed.cluster_ref,
            "state": state,
            "nodesWithoutReadyCache": missing,
            **({"compatible": compatible} if compatible is not None else {}),
        },
        "conditions": conditions,
    }


def ready_cache_nodes(cache_pods: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    """Nodes whose cache pod is Ready."""
    return frozenset(
        str(p["spec"]["nodeName"]) for p in cache_pods if p["spec"].get("nodeName") and pod_ready(p)
    )
