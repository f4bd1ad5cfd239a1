"""The disk bench section runs end to end and reports every field (values are not asserted)."""

from pathlib import Path

import pytest
from lmcache_node.bench.disk import BENCH_DIR_ENV, run_disk_bench

FIELDS = {
    "disk_write_gbps",
    "disk_read_cold_gbps",
    "disk_raw_write_gbps",
    "disk_raw_read_gbps",
    "disk_write_ratio",
    "disk_read_ratio",
    "disk_odirect_write_gbps",
    "disk_odirect_read_gbps",
    "disk_rebuild_seconds",
}


@pytest.mark.slow
def test_quick_disk_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BENCH_DIR_ENV, str(tmp_path))
    result = run_disk_bench(quick=True)
    assert set(result) >= FIELDS
    assert result["disk_byte_exact"] is True
    assert result["disk_rebuild_files"] == 2000
    assert all(float(result[name]) > 0 for name in FIELDS)
    assert list(tmp_path.iterdir()) == []  # cleaned up
