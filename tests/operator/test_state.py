"""forget_unseen: what a watch's re-list tells about pods deleted while it was down (pure)."""

from __future__ import annotations

from typing import Any

from lmcache_operator.state import forget_unseen


def test_pods_missing_from_the_relist_are_dropped_and_their_owners_named() -> None:
    pods: dict[tuple[str, str], dict[str, Any]] = {
        ("a", "c1"): {"p1": {}, "p2": {}},
        ("a", "c2"): {"p3": {}},
        ("b", "c3"): {"p4": {}},
    }
    synced = {"seen": {("a", "p1"), ("a", "p3")}, "namespace": "a"}
    assert forget_unseen(pods.items(), synced) == [("a", "c1")]
    assert pods == {("a", "c1"): {"p1": {}}, ("a", "c2"): {"p3": {}}, ("b", "c3"): {"p4": {}}}


def test_a_cluster_wide_relist_covers_every_namespace() -> None:
    pods: dict[tuple[str, str], dict[str, Any]] = {("a", "c1"): {"p1": {}}, ("b", "c2"): {"p2": {}}}
    assert forget_unseen(pods.items(), {"seen": set(), "namespace": None}) == [
        ("a", "c1"),
        ("b", "c2"),
    ]
    assert pods == {("a", "c1"): {}, ("b", "c2"): {}}
