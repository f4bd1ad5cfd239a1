"""The server bench section runs a real server and reports its fields (values not asserted)."""

from __future__ import annotations

import pytest
from lmcache_node.bench.server import run_server_bench

FIELDS = {
    "server_memcpy_gbps",
    "server_store_gbps",
    "server_retrieve_gbps",
    "server_store_64_gbps",
    "server_retrieve_64_gbps",
    "server_store_ratio",
    "server_retrieve_ratio",
    "server_lookup_100_chunks_p50_ms",
    "store_then_lookup_miss_ratio",
}


@pytest.mark.slow
def test_quick_server_bench_reports_every_field() -> None:
    result = run_server_bench(quick=True)
    assert set(result) >= FIELDS
    assert all(result[name] > 0 for name in FIELDS - {"store_then_lookup_miss_ratio"})
    assert result["store_then_lookup_miss_ratio"] == 0.0  # the reply comes after the commit
