"""The connector's counters in vLLM's own stats: the "KV Transfer metrics" log line and
Prometheus counters on vLLM's ``/metrics``.

vLLM asks the worker's connector for stats after every step (``get_kv_connector_stats``),
sends them to its front end and hands them to the connector class there
(``build_kv_connector_stats``, ``build_prom_metrics``). Only verify mode counts today:
``vllm:lmcache_node_verify_chunks_total{outcome=saved|matched|mismatched|unknown}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from lmcache_node.vllm.verify import OUTCOMES

if TYPE_CHECKING:
    from vllm.config import VllmConfig

VERIFY_METRIC = "vllm:lmcache_node_verify_chunks_total"
_PREFIX = "verify_"


@dataclass
class NodeConnectorStats(KVConnectorStats):  # type: ignore[misc]
    """Counts since the last report: ``verify_<outcome>`` -> chunks (plain ints: vLLM
    serializes the data between its processes)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    @classmethod
    def from_verify_counts(cls, counts: dict[str, int]) -> NodeConnectorStats:
        return cls(data={_PREFIX + outcome: int(n) for outcome, n in counts.items()})

    def reset(self) -> None:
        self.data = {_PREFIX + outcome: 0 for outcome in OUTCOMES}

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def aggregate(self, other: KVConnectorStats) -> NodeConnectorStats:
        for name, value in other.data.items():
            self.data[name] = int(self.data.get(name, 0)) + int(value)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: int(value) for name, value in self.data.items()}


class NodeConnectorPromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
    """``vllm:lmcache_node_verify_chunks_total`` per engine and outcome."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._verify = self._counter_cls(
            name=VERIFY_METRIC,
            documentation="Chunks checked by the LMCacheNodeConnector's verify mode, by "
            "outcome: saved (digest recorded), matched, mismatched (loaded bytes differ from "
            "the saved ones), unknown (no digest in this worker).",
            labelnames=[*labelnames, "outcome"],
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for outcome in OUTCOMES:
            count = int(transfer_stats_data.get(_PREFIX + outcome, 0) or 0)
            if count:
                self._verify.labels(*labels, outcome).inc(count)
