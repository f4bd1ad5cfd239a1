"""Prometheus metrics of a cache node: one prefix, base units, ``_total`` counters.

Request-driven series are updated by the server; engine state (L1 usage, evictions,
locks) is read from ``CacheEngine.stats()`` at scrape time by a collector, so it is
never stale. Hit rates belong in PromQL, not here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lmcache_node.engine.core import CacheEngine
from lmcache_node.tiers.metrics import TierCollector

PREFIX = "lmcache_node_"
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip


class _EngineCollector(Collector):
    def __init__(self, engine: CacheEngine, workers: Callable[[], int]) -> None:
        self._engine = engine
        self._workers = workers

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._engine.stats()
        yield GaugeMetricFamily(
            PREFIX + "l1_usage_bytes", "Bytes of L1 pages in use.", value=stats.used_bytes
        )
        yield GaugeMetricFamily(
            PREFIX + "l1_capacity_bytes", "Capacity of the L1 pool.", value=stats.capacity_bytes
        )
        yield GaugeMetricFamily(
            PREFIX + "l1_entries", "Chunks held in L1 (committed or being written).",
            value=stats.entries,
        )  # fmt: skip
        pool = self._engine.pool_state
        yield GaugeMetricFamily(
            PREFIX + "l1_pool_persistent",
            "1 when the L1 pool is a named shm segment the next server adopts, else 0.",
            value=int(pool.persistent),
        )
        yield GaugeMetricFamily(
            PREFIX + "l1_pool_adopted",
            "1 when this server adopted the L1 pool a previous server left, else 0.",
            value=int(pool.origin == "adopted"),
        )
        yield GaugeMetricFamily(
            PREFIX + "l1_adopted_entries", "Chunks adopted with the L1 pool at start.",
            value=stats.adopted_entries,
        )  # fmt: skip
        yield GaugeMetricFamily(
            PREFIX + "l1_adopted_bytes", "Bytes of the chunks adopted with the L1 pool at start.",
            value=stats.adopted_bytes,
        )  # fmt: skip
        yield CounterMetricFamily(
            PREFIX + "evictions", "Chunks evicted from L1.", value=stats.evictions
        )
        yield CounterMetricFamily(
            PREFIX + "evicted_bytes", "Bytes evicted from L1.", value=stats.evicted_bytes
        )
        yield GaugeMetricFamily(
            PREFIX + "active_locks", "Lookup locks currently held.", value=stats.active_locks
        )
        yield GaugeMetricFamily(
            PREFIX + "registered_workers", "KV cache registrations of live workers.",
            value=self._workers(),
        )  # fmt: skip


class NodeMetrics:
    """The server's metrics, registered in ``registry`` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            PREFIX + "requests",
            "Requests by op and outcome (ok or an error code).",
            ["op", "outcome"],
            registry=self.registry,
        )
        self.tokens = Counter(
            PREFIX + "tokens",
            "Tokens by kind: lookup (asked), hit, stored, retrieved.",
            ["kind"],
            registry=self.registry,
        )
        self.bytes = Counter(
            PREFIX + "bytes", "Bytes moved by op and tier.", ["op", "tier"], registry=self.registry
        )
        self.latency = Histogram(
            PREFIX + "operation_duration_seconds",
            "Time to serve a request, by op.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.sessions_dropped = Counter(
            PREFIX + "sessions_dropped",
            "Client sessions dropped by reason (heartbeat timeout, end, replaced).",
            ["reason"],
            registry=self.registry,
        )
        self.info = Info(
            PREFIX + "server", "The server's version and the device it serves.",
            registry=self.registry,
        )  # fmt: skip
        self._engine_collector: _EngineCollector | None = None
        self._tier_collector: TierCollector | None = None

    def attach_engine(self, engine: CacheEngine, workers: Callable[[], int]) -> None:
        if self._engine_collector is not None:
            self.registry.unregister(self._engine_collector)
        if self._tier_collector is not None:
            self.registry.unregister(self._tier_collector)
        self._engine_collector = _EngineCollector(engine, workers)
        self.registry.register(self._engine_collector)
        self._tier_collector = TierCollector(engine)  # per-tier hits, bytes, usage, errors
        self.registry.register(self._tier_collector)

    def observe(self, op: str, outcome: str, seconds: float) -> None:
        self.requests.labels(op=op, outcome=outcome).inc()
        self.latency.labels(op=op).observe(seconds)
