"""LMCacheCluster status from what the API server reports: pure, testable without a cluster."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from lmcache_operator.podfailures import container_failures, describe

CONDITION_TYPES = ("Ready", "Available", "Progressing", "Degraded", "ConfigValid")


@dataclass(frozen=True)
class Observed:
    """Everything the status is computed from."""

    generation: int
    applied_generation: int | None  # CR generation whose children were applied (None: not yet)
    min_daemonset_generation: int  # the DaemonSet generation our last apply produced
    problems: Sequence[str]  # invalid spec: ConfigValid=False
    port: int
    node_selector: Mapping[str, str]
    daemonset: Mapping[str, Any] | None
    pods: Sequence[Mapping[str, Any]]
    previous: Mapping[str, Any]  # the status as it is now on the object
    monitoring_condition: Mapping[str, str] | None = None  # type/status/reason/message
    node_problems: Mapping[str, str] = field(default_factory=dict)  # node -> "NotReady", ...
    forbidden: str | None = None  # RBAC refused the last apply: reason Forbidden
    device: str = ""  # what the servers serve (spec.device resolved): each endpoint says it
    memory_problems: Sequence[str] = ()  # nodes whose pool + vLLM requests do not fit


RFC3339 = "%Y-%m-%dT%H:%M:%SZ"  # what the API server writes (creationTimestamp, ...)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime(RFC3339)


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime(RFC3339)


def parse_rfc3339(text: str) -> float | None:
    """Seconds since the epoch of an RFC 3339 time (UTC when it names no zone); None when
    ``text`` is not one."""
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def pod_ready(pod: Mapping[str, Any]) -> bool:
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


def pod_restarts(pod: Mapping[str, Any]) -> int:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return sum(int(s.get("restartCount", 0)) for s in statuses)


def endpoints(
    pods: Sequence[Mapping[str, Any]],
    port: int,
    node_problems: Mapping[str, str] | None = None,
    device: str = "",
) -> list[dict[str, Any]]:
    bad_nodes = node_problems or {}
    result = []
    for pod in pods:
        node = pod.get("spec", {}).get("nodeName")
        if not node or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            continue
        result.append(
            {
                "node": node,
                "hostIP": pod.get("status", {}).get("hostIP", ""),
                "port": port,
                "pod": pod["metadata"]["name"],
                "ready": pod_ready(pod) and node not in bad_nodes,
                "restarts": pod_restarts(pod),
                **({"device": device} if device else {}),
            }
        )
    result.sort(key=lambda e: (e["node"], e["pod"]))
    return result


def pod_failures(pod: Mapping[str, Any]) -> list[dict[str, str]]:
    """Failing containers of a pod (a handler's summary carries them precomputed)."""
    if "failures" in pod:
        return list(pod["failures"])
    return container_failures(pod.get("status") or {})


def _failing_servers(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """'<pod> on <node>: server CrashLoopBackOff (exit 1: <its last log line>)' per pod."""
    failing = []
    for pod in pods:
        if pod.get("metadata", {}).get("deletionTimestamp") or pod_ready(pod):
            continue
        failures = pod_failures(pod)
        if failures:
            node = pod.get("spec", {}).get("nodeName") or "no node"
            failing.append(f"{pod['metadata']['name']} on {node}: {describe(failures)}")
    return sorted(failing)


def _unschedulable(pods: Sequence[Mapping[str, Any]]) -> str:
    """The scheduler's message for a pod it cannot place (e.g. the port is taken)."""
    for pod in pods:
        if pod.get("spec", {}).get("nodeName"):
            continue
        for condition in pod.get("status", {}).get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                return str(condition.get("message") or condition.get("reason") or "")
    return ""


def _counts(daemonset: Mapping[str, Any] | None) -> dict[str, int]:
    status = (daemonset or {}).get("status", {})
    desired = int(status.get("desiredNumberScheduled", 0))
    return {
        "desiredNodes": desired,
        "currentNodes": int(status.get("currentNumberScheduled", 0)),
        "readyNodes": int(status.get("numberReady", 0)),
        "updatedNodes": int(status.get("updatedNumberScheduled", 0)),
        "unavailableNodes": int(status.get("numberUnavailable", 0)),
    }


def _daemonset_current(observed: Observed) -> bool:
    """The DaemonSet we see carries our last apply and its controller has processed it."""
    ds = observed.daemonset
    if ds is None:
        return False
    generation = int(ds.get("metadata", {}).get("generation", 0))
    seen = int(ds.get("status", {}).get("observedGeneration", 0))
    return generation >= observed.min_daemonset_generation and seen >= generation


def _phase_and_reasons(
    observed: Observed, counts: Mapping[str, int], eps: Sequence[Mapping[str, Any]]
) -> tuple[str, str, str]:
    """(phase, reason, message)."""
    if observed.problems:
        return "Failed", "InvalidSpec", "; ".join(observed.problems)
    if observed.forbidden:
        phase = "Pending" if observed.daemonset is None else "Progressing"
        return phase, "Forbidden", observed.forbidden
    if observed.daemonset is None or observed.applied_generation is None:
        return "Pending", "Creating", "creating the cache DaemonSet"
    if not _daemonset_current(observed):
        return "Progressing", "RollingOut", "waiting for the DaemonSet controller"
    desired = counts["desiredNodes"]
    if desired == 0:
        selector = ", ".join(f"{k}={v}" for k, v in sorted(observed.node_selector.items()))
        return (
            "Pending",
            "NoMatchingNodes",
            f"no node matches placement.nodeSelector ({selector or 'none'}): label nodes or "
            "change the selector",
        )
    not_ready = sorted({e["node"] for e in eps if not e["ready"]})
    ready_nodes = len({e["node"] for e in eps if e["ready"]})
    missing = max(0, desired - len({e["node"] for e in eps}))
    if counts["updatedNodes"] < counts["currentNodes"]:  # pods of an older template remain
        return (
            "Progressing",
            "RollingOut",
            f"{counts['updatedNodes']} of {desired} nodes run the current spec",
        )
    if counts["readyNodes"] >= desired and not not_ready and missing == 0:
        return "Ready", "AllNodesReady", f"cache servers ready on {desired} of {desired} nodes"
    parts = []
    if not_ready:
        named = [
            f"{node} (node {observed.node_problems[node]})"
            if node in observed.node_problems
            else node
            for node in not_ready
        ]
        parts.append(f"cache pods not ready on {', '.join(named)}")
    if missing:
        parts.append(f"{missing} node(s) without a cache pod")
        unschedulable = _unschedulable(observed.pods)
        if unschedulable:
            parts.append(f"unschedulable: {unschedulable}")
    if not parts:
        parts.append("waiting for the DaemonSet controller to count the ready pods")
    message = f"{ready_nodes} of {desired} nodes ready; " + "; ".join(parts)
    failing = _failing_servers(observed.pods)
    if failing:  # crash loops, image pulls: waiting will not fix them
        return "Degraded", "ServersFailing", message + "; failing: " + "; ".join(failing)
    was_ready = observed.previous.get("phase") in ("Ready", "Degraded") and (
        observed.previous.get("observedGeneration") == observed.applied_generation
    )
    if was_ready:
        return "Degraded", "NodesNotReady", message
    return "Progressing", "PodsStarting", message


def _condition(
    previous: Mapping[str, Mapping[str, Any]],
    ctype: str,
    *,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> dict[str, Any]:
    text = "True" if status else "False"
    before = previous.get(ctype)
    changed = before is None or before.get("status") != text
    return {
        "type": ctype,
        "status": text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now
        if changed or before is None
        else before.get("lastTransitionTime", now),
        "observedGeneration": generation,
    }


def compute_status(observed: Observed, now: str | None = None) -> dict[str, Any]:
    """The whole status object (camelCase, as stored)."""
    now = now or now_rfc3339()
    counts = _counts(observed.daemonset)
    eps = endpoints(observed.pods, observed.port, observed.node_problems, observed.device)
    phase, reason, message = _phase_and_reasons(observed, counts, eps)
    if observed.memory_problems and phase in ("Ready", "Degraded"):
        memory = (
            "memory does not fit on "
            + "; ".join(observed.memory_problems)
            + (": lower cache.cpuSize or the vLLM pods' memory, or give them other nodes")
        )
        if phase == "Ready":
            phase, reason, message = "Degraded", "MemoryOvercommitted", memory
        else:
            message = f"{message}; {memory}"
    previous = {c["type"]: c for c in observed.previous.get("conditions") or []}
    generation = observed.generation
    valid = not observed.problems
    available = counts["readyNodes"] > 0
    progressing = phase in ("Pending", "Progressing")
    rows: list[tuple[str, bool, str, str]] = [
        ("Ready", phase == "Ready", reason, message),
        (
            "Available",
            available,
            "ServersReady" if available else "NoServerReady",
            f"{counts['readyNodes']} cache server(s) ready",
        ),
        (
            "Progressing",
            progressing,
            reason if progressing else "Complete",
            message if progressing else "the current spec is rolled out",
        ),
        (
            "Degraded",
            phase == "Degraded",
            reason if phase == "Degraded" else "AsExpected",
            message if phase == "Degraded" else "",
        ),
        (
            "ConfigValid",
            valid,
            "Valid" if valid else "InvalidSpec",
            "" if valid else "; ".join(observed.problems),
        ),
    ]
    if observed.monitoring_condition is not None:
        mon = observed.monitoring_condition
        rows.append((mon["type"], mon["status"] == "True", mon["reason"], mon["message"]))
    conditions = [
        _condition(
            previous,
            ctype,
            status=state,
            reason=why,
            message=text,
            generation=generation,
            now=now,
        )
        for ctype, state, why, text in rows
    ]
    applied = observed.applied_generation
    if observed.problems:
        applied = generation  # the operator has looked at this generation and rejected it
    return {
        "observedGeneration": applied
        if applied is not None
        else observed.previous.get("observedGeneration"),
        "phase": phase,
        **counts,
        "endpoints": eps,
        "conditions": conditions,
    }


def same_status(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal apart from condition timestamps (which only move when a status flips)."""

    def strip(status: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in status.items() if k != "conditions" and v is not None}
        out["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"}
            for c in status.get("conditions") or []
        ]
        return out

    return strip(a) == strip(b)
