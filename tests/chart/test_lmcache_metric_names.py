"""The PrometheusRule's recording rules: our metrics under LMCache's names, for its dashboards."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.chart.conftest import REPO, Render, one
from tests.chart.test_render import MONITORING_API, NOT_YET_EXPORTED, _node_metric_names

pytestmark = pytest.mark.integration  # real server processes / subprocesses

GROUP = "lmcache-metric-names"
DOC = REPO / "docs" / "integrations.md"

# LMCache's own metric names as Prometheus shows them: its 0.5 multi-process server's OTel
# counters (docs "Observability": lmcache_mp.<name>, exported as lmcache_mp_<name>_total for
# counters) and its in-process engine's prometheus_client families (lmcache/observability.py).
LMCACHE_MP = {
    "lmcache_mp_lookup_requested_tokens_total", "lmcache_mp_lookup_hit_tokens_total",
    "lmcache_mp_l1_memory_usage_bytes", "lmcache_mp_l1_read_keys_total",
    "lmcache_mp_l1_write_keys_total", "lmcache_mp_l1_evicted_keys_total",
    "lmcache_mp_l2_store_succeeded_keys_total", "lmcache_mp_l2_store_failed_keys_total",
    "lmcache_mp_l2_prefetch_loaded_keys_total", "lmcache_mp_l2_prefetch_failed_keys_total",
}  # fmt: skip
LMCACHE_IN_PROCESS = {
    *(f"lmcache:{name}_total" for name in (
        "num_retrieve_requests", "num_store_requests", "num_lookup_requests",
        "num_requested_tokens", "num_hit_tokens", "num_stored_tokens", "num_lookup_tokens",
        "num_lookup_hits", "num_remote_read_bytes", "num_remote_write_bytes",
        "local_cpu_evict_keys_count",
    )),
    "lmcache:local_cache_usage", "lmcache:local_storage_usage",
    *(f"lmcache:{h}{s}" for h in ("time_to_retrieve", "time_to_store", "time_to_lookup")
      for s in ("_bucket", "_sum", "_count")),
}  # fmt: skip


def _records(objects: list[dict[str, Any]]) -> dict[str, str]:
    rule = one(objects, "PrometheusRule")
    groups = {g["name"]: g for g in rule["spec"]["groups"]}
    return {r["record"]: r["expr"] for r in groups[GROUP]["rules"]} if GROUP in groups else {}


def _documented() -> dict[str, str]:
    """record -> expr from the mapping table of docs/integrations.md."""
    rows = re.findall(
        r"^\| `((?:lmcache_mp_|lmcache:)[a-z0-9_]+)` \| `([^`]+)` \|", DOC.read_text(), re.M
    )
    return dict(rows)


def test_records_use_lmcaches_names_and_only_exported_metrics(render: Render) -> None:
    records = _records(render({"monitoring.prometheusRule.enabled": "true"},
                              api_versions=[MONITORING_API]))  # fmt: skip
    assert any(name.startswith("lmcache_mp_") for name in records)
    assert any(name.startswith("lmcache:") for name in records)
    invented = set(records) - LMCACHE_MP - LMCACHE_IN_PROCESS
    assert not invented, f"not LMCache metric names: {sorted(invented)}"
    exported = _node_metric_names() | NOT_YET_EXPORTED
    for name, expr in records.items():
        used = set(re.findall(r"\blmcache_node_[a-z0-9_]+", expr))
        assert used and used <= exported, f"{name}: {expr} uses {sorted(used - exported)}"
        if name.endswith("_total"):  # counters stay counters: sums of counters, no rates
            assert "rate(" not in expr and "_total" in expr, (name, expr)
        if name.endswith("_bucket"):  # histogram buckets keep their le label
            assert "without (op)" in expr and "_bucket" in expr, (name, expr)


def test_every_record_is_documented_with_its_expression(render: Render) -> None:
    records = _records(render({"monitoring.prometheusRule.enabled": "true"},
                              api_versions=[MONITORING_API]))  # fmt: skip
    assert _documented() == records


def test_records_can_be_turned_off(render: Render) -> None:
    values = {"monitoring.prometheusRule.enabled": "true",
              "monitoring.prometheusRule.lmcacheMetricNames": "false"}  # fmt: skip
    objects = render(values, api_versions=[MONITORING_API])
    assert _records(objects) == {}
    rule = one(objects, "PrometheusRule")
    assert [g["name"] for g in rule["spec"]["groups"]] == ["lmcache-node"]  # alerts stay
