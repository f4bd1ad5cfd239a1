"""Metrics about the operator itself (prefix ``lmcache_operator_``), served at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "lmcache_operator"


class OperatorMetrics:
    """One registry per process (injectable, so tests read their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reconciles = Counter(
            f"{PREFIX}_reconciles",
            "Reconciles (apply of a resource's children) by kind and result "
            "(success, invalid, forbidden, retry, error)",
            ["kind", "result"],
            registry=r,
        )
        self.reconcile_seconds = Histogram(
            f"{PREFIX}_reconcile_duration_seconds",
            "Time to build and apply a resource's children",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Work items queued and not started yet (status refreshes, re-applies, gates, repairs)",
            ["queue"],
            registry=r,
        )
        self.watch_restarts = Counter(
            f"{PREFIX}_watch_restarts",
            "Watch streams re-established after an error or a 410 Gone",
            ["kind"],
            registry=r,
        )
        self.api_errors = Counter(
            f"{PREFIX}_api_errors",
            "Failed API requests by HTTP status code (0: no answer: network, timeout)",
            ["code"],
            registry=r,
        )
        self.children_repaired = Counter(
            f"{PREFIX}_children_repaired",
            "Children re-applied after they were deleted or edited by someone else",
            ["kind"],
            registry=r,
        )
        self.gates_released = Counter(
            f"{PREFIX}_gates_released",
            "vLLM pods whose scheduling gate was lifted (a node with a ready cache was found)",
            registry=r,
        )
        self.gates_timed_out = Counter(
            f"{PREFIX}_gates_timed_out",
            "vLLM pods still gated after the gate timeout (an Event and a condition say why)",
            registry=r,
        )
        self.admissions = Counter(
            f"{PREFIX}_admissions",
            "Pods seen by the injection webhook, by outcome (injected, partial, failed, "
            "skipped: not ours to wire)",
            ["outcome"],
            registry=r,
        )
        self.is_leader = Gauge(
            f"{PREFIX}_is_leader",
            "1 while this replica is the active one (holds the leader Lease), else 0",
            registry=r,
        )

        self.leading = False

    def set_leader(self, leading: bool) -> None:
        self.leading = leading
        self.is_leader.set(1 if leading else 0)

    def api_error(self, status: int, _: str) -> None:
        self.api_errors.labels(code=str(status)).inc()
