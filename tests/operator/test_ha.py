"""Two replicas with a leader Lease: the standby takes over when the leader is killed (-9);
a gated vLLM pod gets an Event and a condition when no cache can take it; /metrics."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.operator.conftest import OperatorProcess
from tests.operator.kubectl import Cluster
from tests.operator.test_cluster import manifest, status
from tests.operator.test_vllm_cluster import (
    POD_SELECTOR,
    cache_manifest,
    condition,
    vllm_manifest,
    wait_cache_ready,
    wait_vllm,
)
from tests.support import sample, wait_until

pytestmark = pytest.mark.k8s


def _leading(operator: OperatorProcess) -> bool:
    try:
        with urllib.request.urlopen(f"{operator.base_url}/healthz", timeout=2) as response:
            return bool(json.loads(response.read())["leader"])
    except OSError:
        return False


@pytest.fixture
def replicas(
    k8s_cluster: Cluster, namespace: str, tmp_path: Path
) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    pair = tuple(
        OperatorProcess(
            k8s_cluster, namespace, tmp_path,
            ("--leader-election", "--lease-namespace", namespace, "--identity", name),
            name=name,
        )
        for name in ("replica-a", "replica-b")
    )  # fmt: skip
    first, second = pair
    try:
        first.start()
        wait_until(lambda: _leading(first), 30, "replica-a to lead")
        second.start()
        yield first, second
    finally:
        for replica in pair:
            replica.stop()
        for replica in pair:
            print(f"--- {replica.name} ---\n{replica.logs()}")


def test_the_standby_takes_over_when_the_leader_is_killed(
    k8s_cluster: Cluster, namespace: str, replicas: tuple[OperatorProcess, OperatorProcess]
) -> None:
    leader, standby = replicas
    k8s_cluster.apply(cache_manifest(port=5700), namespace)
    wait_cache_ready(k8s_cluster, namespace)
    k8s_cluster.apply(vllm_manifest(replicas=1), namespace)
    wait_vllm(
        k8s_cluster, namespace, "Ready", lambda s: condition(s, "Ready").get("status") == "True"
    )
    assert not _leading(standby)
    lease = k8s_cluster.get("lease", "lmcache-operator", namespace)
    assert lease is not None and lease["spec"]["holderIdentity"] == "replica-a"

    leader.stop(kill=True)  # SIGKILL: no release of the Lease, the standby must wait it out
    killed = time.monotonic()
    k8s_cluster.apply(manifest(name="fresh"), namespace)
    k8s_cluster.kubectl("scale", "vllmd/llm", "-n", namespace, "--replicas=2")

    def fresh_ready() -> bool:
        st = status(k8s_cluster, namespace, "fresh")
        return st.get("phase") == "Ready" and st.get("readyNodes") == 2

    def pods_released() -> bool:
        pods = k8s_cluster.items("pods", namespace, POD_SELECTOR)
        return len(pods) == 2 and not any(p["spec"].get("schedulingGates") for p in pods)

    wait_until(fresh_ready, 60, "the new LMCacheCluster Ready under the new leader")
    ready_after = time.monotonic() - killed
    wait_until(pods_released, 60, "the new vLLM pod released from its gate")
    released_after = time.monotonic() - killed
    print(f"takeover: new cluster Ready {ready_after:.1f} s, gate lifted {released_after:.1f} s")
    assert _leading(standby)
    lease = k8s_cluster.get("lease", "lmcache-operator", namespace)
    assert lease is not None and lease["spec"]["holderIdentity"] == "replica-b"
    assert "lmcache_operator_is_leader 1.0" in standby.metrics()


def test_a_clean_stop_hands_the_lease_over(
    k8s_cluster: Cluster, namespace: str, replicas: tuple[OperatorProcess, OperatorProcess]
) -> None:
    leader, standby = replicas
    leader.stop()  # SIGTERM: kopf stops, the Lease is released
    wait_until(lambda: _leading(standby), 20, "replica-b to lead")
    k8s_cluster.apply(manifest(name="after"), namespace)
    wait_until(
        lambda: status(k8s_cluster, namespace, "after").get("phase") == "Ready",
        60,
        "the LMCacheCluster Ready under replica-b",
    )


NOWHERE_CACHE = """
apiVersion: lmcache.dev/v1alpha1
kind: LMCacheCluster
metadata: {name: cache}
spec:
  image: {repository: lmcache.local/node, tag: dev, pullPolicy: Never}
  server: {port: 5800}
  placement: {nodeSelector: {no-such-label: "true"}}
"""


@pytest.fixture
def quick_gates(k8s_cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    process = OperatorProcess(k8s_cluster, namespace, tmp_path, ("--gate-timeout", "2"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


def test_a_pod_gated_too_long_gets_an_event_and_a_condition(
    k8s_cluster: Cluster, namespace: str, quick_gates: OperatorProcess
) -> None:
    k8s_cluster.apply(NOWHERE_CACHE, namespace)
    k8s_cluster.apply(vllm_manifest(replicas=1), namespace)

    def reported() -> dict[str, Any] | None:
        for pod in k8s_cluster.items("pods", namespace, POD_SELECTOR):
            for cond in pod["status"].get("conditions") or []:
                if cond["type"] == "lmcache.dev/CacheGate":
                    return {"pod": pod, "condition": cond}
        return None

    found = wait_until(reported, 60, "the CacheGate condition on the gated pod")
    cond, pod = found["condition"], found["pod"]
    assert cond["status"] == "False" and cond["reason"] == "CacheGateTimeout"
    assert "no node has a Ready cache pod of LMCacheCluster 'cache'" in cond["message"]
    assert pod["spec"].get("schedulingGates")  # still gated: Required colocation
    assert any(c["type"] == "PodScheduled" for c in pod["status"]["conditions"])  # kept
    events = wait_until(
        lambda: [
            e
            for e in k8s_cluster.items("events", namespace)
            if e.get("reason") == "CacheGateTimeout"
            and e["involvedObject"]["name"] == pod["metadata"]["name"]
        ],
        30,
        "the CacheGateTimeout Event",
    )
    assert events[0]["type"] == "Warning"

    # one count per pod that timed out (a template change, e.g. the cluster's keys arriving,
    # may have replaced the first gated pod by a second one that timed out too)
    def counted() -> tuple[float | None, int] | None:
        timed_out = {
            e["involvedObject"]["name"]
            for e in k8s_cluster.items("events", namespace)
            if e.get("reason") == "CacheGateTimeout"
        }
        value = sample(quick_gates.metrics(), "lmcache_operator_gates_timed_out_total")
        return (value, len(timed_out)) if value == len(timed_out) else None

    result = wait_until(counted, 30, "one timed-out count per pod with the Event")
    assert result is not None and result[1] >= 1 and result[0] == result[1]
    page = quick_gates.metrics()
    assert 'lmcache_operator_reconciles_total{kind="VLLMDeployment",result="success"}' in page
    assert 'lmcache_operator_reconcile_duration_seconds_count{kind="LMCacheCluster"}' in page
