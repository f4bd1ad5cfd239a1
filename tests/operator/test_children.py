"""Drift detection of children (pure): the projection and the repair requests."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from lmcache_operator.controllers.children import ChildRepairer, project
from lmcache_operator.metrics import OperatorMetrics

from tests.support import wait_until_async

DESIRED = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "llm", "namespace": "ns", "labels": {"a": "1"}},
    "spec": {
        "replicas": 2,
        "template": {"spec": {"containers": [{"name": "vllm", "image": "v:1"}]}},
    },
}
# what the API server returns: defaults, other managers' labels, status
APPLIED = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {
        "name": "llm",
        "namespace": "ns",
        "labels": {"a": "1", "added-by-someone": "x"},
        "resourceVersion": "7",
    },
    "spec": {
        "replicas": 2,
        "template": {
            "spec": {
                "containers": [{"name": "vllm", "image": "v:1", "imagePullPolicy": "IfNotPresent"}]
            }
        },
    },
    "status": {"readyReplicas": 1},
}


def test_projection_keeps_only_our_fields() -> None:
    projected = project(APPLIED, DESIRED)
    assert projected["metadata"] == {"name": "llm", "namespace": "ns", "labels": {"a": "1"}}
    assert "replicas" not in projected["spec"]  # scaled by others: never drift
    assert projected["spec"]["template"]["spec"]["containers"] == [{"name": "vllm", "image": "v:1"}]
    assert "status" not in projected


def test_an_extra_list_item_is_visible() -> None:
    live = copy.deepcopy(APPLIED)
    live["spec"]["template"]["spec"]["containers"].append({"name": "sidecar"})
    assert project(live, DESIRED) != project(APPLIED, DESIRED)


class Recorder:
    def __init__(self) -> None:
        self.requested: list[tuple[str, str]] = []

    def __call__(self, key: tuple[str, str]) -> None:
        self.requested.append(key)


def _repairer(interval: float = 2.0) -> tuple[ChildRepairer, Recorder, list[float]]:
    recorder = Recorder()
    now = [100.0]
    repairer = ChildRepairer(
        {"VLLMDeployment": recorder},
        OperatorMetrics(),
        min_interval_s=interval,
        clock=lambda: now[0],
    )
    repairer.record("VLLMDeployment", ("ns", "llm"), [DESIRED], [APPLIED])
    return repairer, recorder, now


def test_our_own_events_and_other_managers_fields_repair_nothing() -> None:
    repairer, recorder, _ = _repairer()
    repairer.on_event("MODIFIED", APPLIED)
    scaled: dict[str, Any] = copy.deepcopy(APPLIED)
    scaled["spec"]["replicas"] = 5  # an HPA or kubectl scale
    scaled["metadata"]["labels"]["team"] = "b"
    scaled["status"] = {"readyReplicas": 5}
    repairer.on_event("MODIFIED", scaled)
    assert recorder.requested == []


def test_an_edited_field_or_a_deletion_asks_the_owner_to_reapply() -> None:
    repairer, recorder, now = _repairer()
    edited = copy.deepcopy(APPLIED)
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
    repairer.on_event("MODIFIED", edited)
    assert recorder.requested == [("ns", "llm")]
    now[0] += 5
    repairer.on_event("DELETED", APPLIED)
    assert recorder.requested == [("ns", "llm"), ("ns", "llm")]
    counted = repairer.metrics.children_repaired.labels(kind="Deployment")._value.get()
    assert counted == 2


def test_a_fight_costs_one_repair_per_interval() -> None:
    async def run() -> list[tuple[str, str]]:
        repairer, recorder, _ = _repairer(interval=0.05)  # the fake clock stands still
        edited = copy.deepcopy(APPLIED)
        edited["metadata"]["labels"]["a"] = "2"
        repairer.on_event("MODIFIED", edited)
        repairer.on_event("MODIFIED", edited)  # again within the interval: postponed
        assert recorder.requested == [("ns", "llm")]
        await wait_until_async(lambda: len(recorder.requested) == 2, 5, "the postponed repair")
        return recorder.requested

    assert asyncio.run(run()) == [("ns", "llm"), ("ns", "llm")]


def test_children_of_a_deleted_owner_are_forgotten() -> None:
    repairer, recorder, _ = _repairer()
    repairer.forget_owner("VLLMDeployment", ("ns", "llm"))
    repairer.on_event("DELETED", APPLIED)
    assert recorder.requested == []


def test_same_generation_compares_metadata_only_and_still_sees_label_edits() -> None:
    applied = copy.deepcopy(APPLIED)
    applied["metadata"]["generation"] = 3
    recorder = Recorder()
    repairer = ChildRepairer({"VLLMDeployment": recorder}, OperatorMetrics(), min_interval_s=0)
    repairer.record("VLLMDeployment", ("ns", "llm"), [DESIRED], [applied])
    status_only = copy.deepcopy(applied)
    status_only["status"] = {"readyReplicas": 2}
    repairer.on_event("MODIFIED", status_only)
    assert recorder.requested == []
    relabelled = copy.deepcopy(applied)
    relabelled["metadata"]["labels"]["a"] = "edited"
    repairer.on_event("MODIFIED", relabelled)
    assert recorder.requested == [("ns", "llm")]
    new_spec = copy.deepcopy(applied)
    new_spec["metadata"]["generation"] = 4
    new_spec["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
    repairer.on_event("MODIFIED", new_spec)
    assert recorder.requested == [("ns", "llm"), ("ns", "llm")]
