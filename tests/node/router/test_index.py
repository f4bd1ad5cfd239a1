"""The router's per-node key index: prefix queries as the engine looks up, and its bound."""

from __future__ import annotations

import numpy as np
from lmcache_node.protocol.events import NamespaceInfo
from lmcache_node.router.index import NodeIndex


def packed(values: list[int]) -> bytes:
    return np.asarray(values, dtype="<u8").tobytes()


def test_prefix_counts_l1_then_continues_in_l2_only() -> None:
    index = NodeIndex("n")
    index.stored("l1", [1, 2, 4])
    index.stored("l2", [2, 3, 5])
    # 1, 2 in L1; 3 only on disk; 4 is in L1 but the engine looks below L1 after 3: a miss
    hold = index.hold([1, 2, 3, 4, 5])
    assert (hold.l1, hold.l2) == (2, 1)
    assert index.hold([9, 1]).chunks == 0
    assert index.hold([3, 5]).l2 == 2


def test_evictions_and_clears_are_per_tier() -> None:
    index = NodeIndex("n")
    index.stored("l1", [1, 2])
    index.stored("l2", [2])
    index.evicted("l1", [2, 7])  # 7 was never there: ignored
    assert index.entries == {1: 1, 2: 2}
    index.cleared("l1")
    assert index.entries == {2: 2}
    index.stored("remote", [5])  # a tier the router does not index
    assert 5 not in index.entries


def test_a_snapshot_replaces_everything() -> None:
    index = NodeIndex("n")
    index.stored("l1", [1, 2, 3])
    index.replace({"l1": packed([10, 11]), "l2": packed([11, 2**63 + 5])})
    assert index.entries == {10: 1, 11: 3, 2**63 + 5: 2}
    assert index.count("l1") == 2 and index.count("l2") == 2


def test_the_bound_drops_the_oldest_keys_first() -> None:
    index = NodeIndex("n", max_keys=1000)
    index.stored("l1", range(1000))
    assert len(index.entries) == 1000 and index.dropped == 0
    index.stored("l1", range(1000, 1010))
    assert len(index.entries) <= 1000
    assert index.dropped >= 10
    assert 0 not in index.entries and 1009 in index.entries  # oldest out, newest kept
    for start in range(2000, 50_000, 1000):  # keeps holding under churn
        index.stored("l1", range(start, start + 1000))
        assert len(index.entries) <= 1000


def test_seeds_are_the_rank_zero_namespaces_of_the_model() -> None:
    index = NodeIndex("n")
    index.namespaces = [
        NamespaceInfo(seed=b"a" * 16, model_name="m", worker_id=0),
        NamespaceInfo(seed=b"b" * 16, model_name="m", worker_id=1),
        NamespaceInfo(seed=b"c" * 16, model_name="other", worker_id=0),
    ]
    assert index.seeds_for("m") == [b"a" * 16]
    assert index.seeds_for(None) == [b"a" * 16, b"c" * 16]
    assert index.seeds_for("nope") == []
