"""The operator's node-by-node rollout of the cache pods, on a real API server (kwok nodes
gpu-0 and gpu-1; their pods run nothing, so each pool reads "unknown": test_pools.py reads a
real server's)."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest

from tests.operator.conftest import OperatorProcess
from tests.operator.kubectl import Cluster, PodRecorder, StatusRecorder
from tests.support import wait_until

pytestmark = pytest.mark.k8s

CACHE = """
apiVersion: lmcache.dev/v1alpha1
kind: LMCacheCluster
metadata: {{name: cache}}
spec:
  image: {{repository: lmcache.local/node, tag: dev, pullPolicy: Never}}
  cache: {{cpuSize: {cpu}}}
  server: {{port: {port}, httpPort: {http_port}, eventsPort: 0}}
  updateStrategy: {{type: {strategy}}}
"""
VLLM = """
apiVersion: lmcache.dev/v1alpha1
kind: VLLMDeployment
metadata: {name: llm}
spec:
  model: {name: org/model}
  replicas: 2
  resources: {gpus: 4}
  cache: {clusterRef: {name: cache}}
"""
CACHE_PODS = "lmcache.dev/cluster=cache,app.kubernetes.io/name=lmcache-node"
_PORTS = itertools.count(27000, 2)


def cache(cpu: str, port: int, strategy: str = "RollingUpdate") -> str:
    return CACHE.format(cpu=cpu, port=port, http_port=port + 1, strategy=strategy)


def status(k8s: Cluster, ns: str) -> dict[str, Any]:
    return (k8s.get("lmcc", "cache", ns) or {}).get("status") or {}


def rolled(k8s: Cluster, ns: str, generation: int) -> dict[str, Any] | None:
    st = status(k8s, ns)
    rollout = st.get("rollout") or {}
    done = (
        st.get("observedGeneration") == generation
        and st.get("phase") == "Ready"
        and rollout.get("state") == "Complete"
        and rollout.get("updatedNodes") == 2
    )
    return st if done else None


def test_a_spec_change_replaces_one_node_at_a_time_and_marks_its_vllm_pods(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    port = next(_PORTS)
    k8s_cluster.apply(cache("4Gi", port), namespace)
    wait_until(lambda: rolled(k8s_cluster, namespace, 1), 60, "cluster Ready")
    k8s_cluster.apply(VLLM, namespace)

    def running_vllm_pods() -> list[dict[str, Any]] | None:
        pods = k8s_cluster.items("pods", namespace, "lmcache.dev/vllm-deployment=llm")
        running = [x for x in pods if x["status"].get("phase") == "Running"]
        return running if len(running) == 2 else None

    vllm_pods = wait_until(running_vllm_pods, 60, "2 vLLM pods running")
    vllm_nodes = {p["spec"]["nodeName"] for p in vllm_pods}
    ds = k8s_cluster.get("daemonset", "cache-cache", namespace)
    assert ds is not None and ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    old = {p["metadata"]["name"] for p in k8s_cluster.items("pods", namespace, CACHE_PODS)}
    with (
        StatusRecorder(k8s_cluster, namespace, "cache") as statuses,
        PodRecorder(k8s_cluster, namespace, "lmcache.dev/vllm-deployment=llm") as vllm,
        PodRecorder(k8s_cluster, namespace, CACHE_PODS) as pods,
    ):
        vllm.listed(2)
        pods.listed(2)
        wait_until(lambda: statuses.seen, 30, "the status watch listing the cluster")
        k8s_cluster.apply(cache("6Gi", port), namespace)
        st = wait_until(lambda: rolled(k8s_cluster, namespace, 2), 120, "rolled to generation 2")
        # the recorders have seen what the status says: both new cache pods Ready
        wait_until(lambda: len(pods.ready_pods(old)) == 2, 30, "2 new cache pods seen Ready")
    rollout = st["rollout"]
    revision = k8s_cluster.get("daemonset", "cache-cache", namespace)["spec"]["template"][  # type: ignore[index]
        "metadata"
    ]["annotations"]["lmcache.dev/template-hash"]
    assert rollout["revision"] == revision
    assert [(n["node"], n["state"]) for n in rollout["nodes"]] == [
        ("gpu-0", "Updated"), ("gpu-1", "Updated"),
    ]  # fmt: skip
    for node in rollout["nodes"]:
        assert node["seconds"] >= 0 and node["pod"] not in old
        assert node["pool"] == "unknown"  # kwok pods serve no /readyz
    # one node at a time (maxUnavailable 1): never two in progress, and the second old pod
    # deleted only after the first node's new pod was Ready
    in_progress = [tuple(s.get("rollout", {}).get("nodesInProgress") or ()) for s in statuses.seen]
    # (status writes within a phase are coalesced, at most one per 0.25 s, and a kwok pod is
    # replaced in ~0.2 s: the status may skip a node's moment in progress; the pod events
    # below show each node's replacement)
    assert max(len(n) for n in in_progress) == 1, in_progress
    deleted_at: dict[str, int] = {}
    for i, (_, name, _, _, deleting, _) in enumerate(pods.seen):
        if deleting and name in old:
            deleted_at.setdefault(name, i)
    first, second = sorted(deleted_at, key=deleted_at.__getitem__)
    node_of = {name: node for _, name, node, _, _, _ in pods.seen}
    first_node = node_of[first]
    assert {first_node, node_of[second]} == {"gpu-0", "gpu-1"}
    ready_new = [
        i for i, (_, name, node, ready, _, _) in enumerate(pods.seen)
        if name not in old and node == first_node and ready
    ]  # fmt: skip
    assert ready_new and ready_new[0] < deleted_at[second], pods.seen
    # the vLLM pods on each node were marked while its cache pod was replaced, then unmarked,
    # and kept running (same pods)
    marked = {node for _, _, node, _, _, mark in vllm.seen if mark}
    assert marked == vllm_nodes, vllm.seen
    final = k8s_cluster.items("pods", namespace, "lmcache.dev/vllm-deployment=llm")
    assert {p["metadata"]["name"] for p in final} == {p["metadata"]["name"] for p in vllm_pods}
    assert not any(
        "lmcache.dev/cache-rollout" in (p["metadata"].get("annotations") or {}) for p in final
    )


def test_on_delete_leaves_the_pods_until_you_delete_them(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    port = next(_PORTS)
    k8s_cluster.apply(cache("4Gi", port, "OnDelete"), namespace)
    wait_until(lambda: rolled(k8s_cluster, namespace, 1), 60, "cluster Ready")
    old = {p["spec"]["nodeName"]: p["metadata"]["name"]
           for p in k8s_cluster.items("pods", namespace, CACHE_PODS)}  # fmt: skip
    k8s_cluster.apply(cache("6Gi", port, "OnDelete"), namespace)

    def manual() -> dict[str, Any] | None:
        rollout = status(k8s_cluster, namespace).get("rollout") or {}
        return rollout if rollout.get("state") == "Manual" else None

    rollout = wait_until(manual, 30, "rollout state Manual")
    assert "delete the cache pods on gpu-0, gpu-1" in rollout["message"], rollout
    time.sleep(3)  # nothing is replaced meanwhile
    pods = {p["metadata"]["name"] for p in k8s_cluster.items("pods", namespace, CACHE_PODS)}
    assert pods == set(old.values())
    k8s_cluster.kubectl("delete", "pod", old["gpu-0"], "-n", namespace)

    def one_updated() -> dict[str, Any] | None:
        rollout = status(k8s_cluster, namespace).get("rollout") or {}
        states = {n["node"]: n["state"] for n in rollout.get("nodes") or []}
        return rollout if states == {"gpu-0": "Updated", "gpu-1": "Waiting"} else None

    rollout = wait_until(one_updated, 60, "gpu-0 updated, gpu-1 waiting")
    assert rollout["state"] == "Manual" and rollout["updatedNodes"] == 1
    assert "delete the cache pods on gpu-1 " in rollout["message"], rollout


def test_max_unavailable_replaces_that_many_nodes_at_once(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    port = next(_PORTS)
    spec = cache("4Gi", port).replace("{type: RollingUpdate}", "{maxUnavailable: 2}")
    k8s_cluster.apply(spec, namespace)
    wait_until(lambda: rolled(k8s_cluster, namespace, 1), 60, "cluster Ready")
    old = {p["metadata"]["name"] for p in k8s_cluster.items("pods", namespace, CACHE_PODS)}
    with PodRecorder(k8s_cluster, namespace, CACHE_PODS) as pods:
        pods.listed(2)
        k8s_cluster.apply(spec.replace("cpuSize: 4Gi", "cpuSize: 5Gi"), namespace)
        wait_until(lambda: rolled(k8s_cluster, namespace, 2), 120, "rolled to generation 2")
        wait_until(lambda: len(pods.ready_pods(old)) == 2, 30, "2 new cache pods seen Ready")
    # both old pods were deleted before either new pod was ready
    events = [(i, name, ready, deleting) for i, (_, name, _, ready, deleting, _) in
              enumerate(pods.seen)]  # fmt: skip
    first_ready_new = min(
        i
        for i, name, ready, _ in events
        if ready and not any(n == name and d for _, n, _, d in events)
    )
    deletions = {name for i, name, _, deleting in events if deleting and i < first_ready_new}
    assert len(deletions) == 2, json.dumps(pods.seen)
