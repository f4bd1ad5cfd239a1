"""The router's Prometheus metrics (prefix ``lmcache_router_``; base units; ``_total``).

Request series are updated as requests pass; replica and node-index state is read at
scrape time by a collector, so it is never stale.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lmcache_node.router.core import Router

PREFIX = "lmcache_router_"
_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _StateCollector(Collector):
    def __init__(self, router: Router) -> None:
        self._router = router

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        healthy = GaugeMetricFamily(
            PREFIX + "replica_healthy", "1 when the replica answers.", labels=["replica"]
        )
        in_flight = GaugeMetricFamily(
            PREFIX + "replica_in_flight", "Requests this router has open.", labels=["replica"]
        )
        pending = GaugeMetricFamily(
            PREFIX + "replica_pending_prefill_tokens",
            "Prefill tokens this router estimates the replica still owes.",
            labels=["replica"],
        )
        waiting = GaugeMetricFamily(
            PREFIX + "replica_waiting", "vLLM's waiting requests (scraped).", labels=["replica"]
        )
        for state in list(self._router.replicas.values()):
            name = [state.replica.name]
            healthy.add_metric(name, 1.0 if state.healthy else 0.0)
            in_flight.add_metric(name, state.in_flight)
            pending.add_metric(name, state.pending_prefill)
            waiting.add_metric(name, state.waiting)
        yield from (healthy, in_flight, pending, waiting)
        keys = GaugeMetricFamily(
            PREFIX + "index_keys", "Chunk keys the index holds, by node and tier.",
            labels=["node", "tier"],
        )  # fmt: skip
        synced = GaugeMetricFamily(
            PREFIX + "node_synced", "1 when the node's index is in step with it.", labels=["node"]
        )
        resyncs = CounterMetricFamily(
            PREFIX + "node_resyncs", "Snapshots applied, by node and reason.",
            labels=["node", "reason"],
        )  # fmt: skip
        dropped = CounterMetricFamily(
            PREFIX + "index_dropped_keys", "Keys dropped by the index bound.", labels=["node"]
        )
        for endpoint, source in list(self._router.nodes.items()):
            for tier in ("l1", "l2"):
                keys.add_metric([endpoint, tier], source.index.count(tier))
            synced.add_metric([endpoint], 1.0 if source.index.synced else 0.0)
            for reason, count in source.feed.resyncs.items():
                resyncs.add_metric([endpoint, reason], count)
            dropped.add_metric([endpoint], source.index.dropped)
        yield from (keys, synced, resyncs, dropped)


class RouterMetrics:
    def __init__(self, router: Router, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            PREFIX + "requests", "Requests by replica, API and outcome.",
            ["replica", "api", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.rejected = Counter(
            PREFIX + "rejected_requests", "Requests refused before routing, by reason.",
            ["reason"], registry=self.registry,
        )  # fmt: skip
        self.decisions = Counter(
            PREFIX + "decisions", "Routing decisions by policy and reason.",
            ["policy", "reason"], registry=self.registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of routed requests.", registry=self.registry
        )
        self.cached_tokens = Counter(
            PREFIX + "predicted_cached_tokens",
            "Prompt tokens the chosen replica's caches hold, as the index predicts.",
            registry=self.registry,
        )
        self.routing = Histogram(
            PREFIX + "routing_duration_seconds",
            "The router's own time per request: parsing, tokenizing, deciding.",
            buckets=_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(_StateCollector(router))
