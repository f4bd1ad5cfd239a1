"""Pure logic of the operator-driven rollout (no API server): the maxUnavailable budget
and which nodes a rollout keeps when their pods are gone."""

from __future__ import annotations

from typing import Any

import pytest
from lmcache_operator.controllers.rollout import (
    NodeRoll,
    Rollout,
    RolloutController,
    max_unavailable,
)
from lmcache_operator.metrics import OperatorMetrics
from lmcache_operator.state import ClusterView, Views


@pytest.mark.parametrize(
    ("value", "nodes", "expected"),
    [
        ("30%", 5, 2),  # 1.5 rounds up, as the DaemonSet controller does
        ("25%", 4, 1),
        ("10%", 3, 1),  # never 0
        ("50%", 7, 4),
        ("100%", 3, 3),
        (2, 10, 2),
        (0, 10, 1),
        ("bad%", 4, 1),
    ],
)
def test_max_unavailable_counts_nodes_like_the_daemonset_controller(
    value: int | str, nodes: int, expected: int
) -> None:
    assert max_unavailable(value, nodes) == expected


async def _no_probe(*_: Any) -> Any:
    raise AssertionError("no pod runs the current spec: nothing to probe")


def test_a_replacing_node_stays_without_pods_unless_the_node_was_deleted() -> None:
    views = Views(node_problems={"gone": "deleted", "sick": "NotReady"})
    controller = RolloutController(
        None,  # type: ignore[arg-type]  # _observe makes no API call
        views, OperatorMetrics(), lambda key: None, probe=_no_probe, probe_budget_s=1.0,
    )  # fmt: skip
    rollout = Rollout("rev-2", "2026-12-07T00:00:00Z")
    for node in ("gone", "sick", "between"):
        rollout.nodes[node] = NodeRoll(state="Replacing")
    rollout.nodes["idle"] = NodeRoll(state="Waiting")

    controller._observe(("ns", "cache"), rollout, ClusterView(), port=8080)

    # between its old pod and the new one a node stays in progress, NotReady or not; a
    # deleted node will get no new pod, and one with no pod that is not being replaced goes
    assert sorted(rollout.nodes) == ["between", "sick"]
    assert {r.state for r in rollout.nodes.values()} == {"Replacing"}
