"""Prometheus series of the tiers below L1, read from ``CacheEngine.tier_stats()`` at scrape.

Register with ``registry.register(TierCollector(engine))``. Labels: ``tier`` (disk, remote);
``lmcache_node_remote_rejected_total`` has ``reason`` (see ``remote_values.RejectReason``).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lmcache_node.engine.core import CacheEngine
from lmcache_node.tiers.remote_values import RejectReason

PREFIX = "lmcache_node_tier_"
REMOTE_REJECTED = "lmcache_node_remote_rejected"

_GAUGES = {
    "available": "1 while the tier can be used (0: disabled, or the remote breaker is open).",
    "used_bytes": "Bytes the tier holds (disk: charged against the cap, incl. reservations).",
    "capacity_bytes": "The tier's cap (0: not known, e.g. remote).",
    "entries": "Chunks the tier holds (where it can tell).",
    "pending_tasks": "Queued or running background tasks (prefetch, delete, put).",
}
_COUNTERS = {
    "lookup_hits": "Lookups that found at least one chunk in the tier.",
    "hits": "Chunks read from the tier (promotions).",
    "hit_bytes": "Bytes read from the tier.",
    "misses": "Reads that found nothing usable (absent, unavailable, corrupt).",
    "stores": "Chunks written to the tier.",
    "stored_bytes": "Bytes written to the tier.",
    "dropped_stores": "Writes skipped (full or read-only disk, tier down, queue full).",
    "evictions": "Chunks the tier evicted to stay under its cap.",
    "evicted_bytes": "Bytes the tier evicted.",
    "errors": "I/O or network errors.",
    "corrupt": "Chunks that failed their checks (deleted or ignored, never served).",
}


class TierCollector(Collector):
    def __init__(self, engine: CacheEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._engine.tier_stats()
        tiers = {name: values for name, values in stats.items() if name != "tiering"}
        for field, help_text in _GAUGES.items():
            gauge = GaugeMetricFamily(PREFIX + field, help_text, labels=["tier"])
            for name, values in tiers.items():
                gauge.add_metric([name], float(values.get(field, 0)))
            yield gauge
        for field, help_text in _COUNTERS.items():
            counter = CounterMetricFamily(PREFIX + field, help_text, labels=["tier"])
            for name, values in tiers.items():
                counter.add_metric([name], float(values.get(field, 0)))
            yield counter
        remote = tiers.get("remote")
        if remote is not None:
            rejected = CounterMetricFamily(
                REMOTE_REJECTED,
                "Remote values refused on read (each a miss), by reason: bad_mac (damaged or "
                "written without this cluster's secret), truncated, wrong_key, decompression "
                "(would expand beyond the chunk), malformed.",
                labels=["reason"],
            )
            for reason in RejectReason:
                count = float(remote.get(f"rejected_{reason.value}", 0))
                rejected.add_metric([reason.value], count)
            yield rejected
        engine = self._engine.stats()
        yield CounterMetricFamily(
            PREFIX + "promotions", "Chunks promoted into L1 from a lower tier.", engine.promotions
        )
        yield CounterMetricFamily(
            PREFIX + "promotion_failures",
            "Promotions that failed (the lookup hit became a miss at retrieve).",
            engine.promotion_failures,
        )
        tiering = stats.get("tiering", {})
        yield CounterMetricFamily(
            PREFIX + "writes_dropped",
            "Write-downs dropped because a tier's queue or the staging budget was full.",
            float(tiering.get("writes_dropped", 0)),
        )
