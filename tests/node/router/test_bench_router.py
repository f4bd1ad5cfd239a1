"""The routing bench: its workload, its prefill fit, and a small end-to-end run."""

from __future__ import annotations

import itertools
import json

import pytest
from lmcache_node.bench import router as bench
from lmcache_node.bench.router_prefill import fit_slope
from lmcache_node.bench.router_workload import (
    WorkloadSpec,
    estimated_round_robin_tokens,
    make_workload,
)


def test_the_workload_is_fixed_by_its_seed_and_chats_grow() -> None:
    spec = WorkloadSpec(conversations=30, system_prompts=5)
    turns = make_workload(spec)
    assert [t.tokens for t in turns] == [t.tokens for t in make_workload(spec)]
    assert turns != make_workload(WorkloadSpec(conversations=30, system_prompts=5, seed=1))
    assert [t.arrival for t in turns] == sorted(t.arrival for t in turns)
    by_conversation: dict[int, list[list[int]]] = {}
    for turn in sorted(turns, key=lambda t: (t.conversation, t.index)):
        by_conversation.setdefault(turn.conversation, []).append(turn.tokens)
    for prompts in by_conversation.values():
        assert 4 <= len(prompts) <= 10
        for earlier, later in itertools.pairwise(prompts):
            assert later[: len(earlier)] == earlier  # each turn extends the conversation
    assert all(1024 <= t.system_tokens <= 4096 for t in turns)
    total = sum(len(t.tokens) for t in turns)
    assert 0 < estimated_round_robin_tokens(turns, 256, 4) < total


def test_the_prefill_slope_is_a_least_squares_fit() -> None:
    slope, intercept = fit_slope({100: [0.2, 0.21, 0.19], 200: [0.3], 400: [0.5]})
    assert slope == pytest.approx(0.001)
    assert intercept == pytest.approx(0.1)


@pytest.mark.slow
def test_a_small_run_prints_every_policy_on_the_last_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert bench.main([
        "--prefill-s-per-token", "1e-4", "--conversations", "12", "--system-prompts", "3",
        "--policies", "cache_aware,round_robin,prefix_hash,session,oracle",
        "--model-dir", "/nonexistent", "--l1-chunks", "64",
    ]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for policy in ("cache_aware", "round_robin", "prefix_hash", "session", "oracle"):
        assert 0 <= result[f"{policy}_hit_ratio"] <= 1
        assert 0 < result[f"{policy}_ttft_p50_s"] <= result[f"{policy}_ttft_p99_s"]
    assert result["requests"] > 12 and result["event_barrier_timeouts"] == 0
    assert result["cache_aware_hit_ratio"] > result["round_robin_hit_ratio"]
    assert 40 < result["index_bytes_per_key"] < 200
    assert "not measured" in result["routing_overhead_note"]
