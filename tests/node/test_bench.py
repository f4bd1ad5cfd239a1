import argparse
import json

import pytest
from lmcache_node.bench import runner


@pytest.mark.slow
def test_engine_bench_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    assert runner.run(parser.parse_args(["--json", "--quick", "--sections", "engine"])) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    for field in ("memcpy_gbps", "store_gbps", "retrieve_gbps", "lookup_100_chunks_p50_ms",
                  "pool_store_gbps", "pool_retrieve_gbps"):  # fmt: skip
        assert result[field] > 0
    assert result["chunk_bytes"] == 32 * 1024**2
    assert result["retrieve_byte_exact"] is True
    assert result["lookup_100_chunks_hits"] == 100


def test_unknown_section_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    assert runner.run(parser.parse_args(["--sections", "nope"])) == 2
    assert "unknown bench section" in capsys.readouterr().err


@pytest.mark.slow
def test_restart_bench_serves_every_chunk_after_a_kill(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    assert runner.run(parser.parse_args(["--json", "--quick", "--sections", "restart"])) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["restart_pool_adopted"] is True
    assert result["restart_adopted_chunks"] == result["restart_chunks_stored"] > 0
    assert result["restart_hit_ratio"] == 1.0 and result["restart_byte_exact"] is True
    assert result["restart_adopt_s"] > 0
