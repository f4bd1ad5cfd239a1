"""Routing policies as pure functions of what the router knows."""

from __future__ import annotations

from collections import Counter

import pytest
from lmcache_node.router.scoring import (
    CacheAware,
    Candidate,
    HashRing,
    PrefixHash,
    RoundRobin,
    Session,
    Weights,
    cost,
    credit,
)


def test_credit_weighs_gpu_then_l1_then_l2_without_double_counting() -> None:
    w = Weights(gpu=1.0, l1=0.5, l2=0.25)
    c = Candidate("a", prompt_tokens=1000, gpu_tokens=100, l1_tokens=300, l2_tokens=200)
    assert credit(c, w) == 100 * 1.0 + 200 * 0.5 + 200 * 0.25
    # more cached than the prompt: capped at the prompt
    assert credit(Candidate("a", prompt_tokens=100, l1_tokens=512), w) == 50.0
    # the GPU prefix is longer than the node's: the node adds nothing
    assert credit(Candidate("a", prompt_tokens=1000, gpu_tokens=600, l1_tokens=512), w) == 600


def test_the_replica_holding_the_prefix_wins() -> None:
    policy = CacheAware()
    cold = Candidate("a", prompt_tokens=2048)
    warm = Candidate("b", prompt_tokens=2048, l1_tokens=1792)
    decision = policy.choose([cold, warm])
    assert decision.index == 1 and decision.reason == "cache"
    assert decision.cached_tokens == pytest.approx(1792 * Weights().l1)


def test_load_outweighs_a_small_cached_prefix() -> None:
    policy = CacheAware(Weights(request_tokens=64))
    busy = Candidate("a", prompt_tokens=2048, l1_tokens=256, pending_prefill_tokens=4000)
    idle = Candidate("b", prompt_tokens=2048)
    assert policy.choose([busy, idle]).index == 1
    assert cost(busy, policy.weights) > cost(idle, policy.weights)


def test_cold_prefixes_go_to_the_least_loaded_then_in_turn() -> None:
    policy = CacheAware()
    loaded = [Candidate(n, 512, in_flight=f) for n, f in (("a", 2), ("b", 0), ("c", 0))]
    picks = Counter(policy.choose(loaded).index for _ in range(10))
    assert set(picks) == {1, 2} and picks[1] == picks[2] == 5
    assert policy.choose(loaded).reason == "load"


def test_round_robin_cycles() -> None:
    policy = RoundRobin()
    cands = [Candidate(n, 10) for n in "abc"]
    assert [policy.choose(cands).index for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_prefix_hash_is_consistent_and_moves_little_when_a_replica_goes() -> None:
    policy = PrefixHash()
    four = [Candidate(n, 10) for n in ("r0", "r1", "r2", "r3")]
    keys = [f"prefix-{i}".encode() for i in range(2000)]
    owners = {k: four[policy.choose(four, k).index].name for k in keys}
    assert owners == {k: four[policy.choose(four, k).index].name for k in keys}  # stable
    assert min(Counter(owners.values()).values()) > 300  # spread over all four
    three = four[:3]
    moved = sum(1 for k in keys if three[policy.choose(three, k).index].name != owners[k])
    lost = sum(1 for k in keys if owners[k] == "r3")
    assert moved == lost  # only the removed replica's prefixes move


def test_session_is_sticky_and_falls_back_to_least_loaded() -> None:
    policy = Session()
    cands = [Candidate("a", 10, in_flight=3), Candidate("b", 10)]
    first = policy.choose(cands, "conversation-7").index
    assert all(policy.choose(cands, "conversation-7").index == first for _ in range(5))
    fallback = policy.choose(cands, None)
    assert fallback.index == 1 and fallback.reason == "load"


def test_no_candidate_is_an_error() -> None:
    with pytest.raises(ValueError, match="no candidate"):
        CacheAware().choose([])
    with pytest.raises(ValueError, match="empty"):
        HashRing([]).owner(b"x")
