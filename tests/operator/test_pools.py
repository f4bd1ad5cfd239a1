"""L1 pools on a real API server: the pool a real server reports, adopted across the operator's
rollout; the finalizer and cleanup Jobs of a deleted persistent cluster; the memory check.

kwok pods run nothing, so for the pool test the cluster runs on a kwok node of its own whose
address is a loopback IP (127.0.0.x) where the test runs a real ``lmcache-node serve``: the
operator reads that server's ``/readyz`` as it would a cache pod's on the node's IP.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.operator.conftest import OperatorProcess
from tests.operator.kubectl import Cluster
from tests.support import wait_until

pytestmark = pytest.mark.k8s

_PORTS = itertools.count(28000, 3)
CLUSTER = """
apiVersion: lmcache.dev/v1alpha1
kind: LMCacheCluster
metadata: {{name: cache}}
spec:
  image: {{repository: lmcache.local/node, tag: dev, pullPolicy: Never}}
  device: cpu
  cache: {{cpuSize: {cpu}}}
  server: {{port: {port}, httpPort: {http_port}, eventsPort: 0}}
  placement: {{nodeSelector: {selector}}}
"""


def cluster(cpu: str, port: int, selector: dict[str, str]) -> str:
    return CLUSTER.format(cpu=cpu, port=port, http_port=port + 1, selector=json.dumps(selector))


def status(k8s: Cluster, ns: str) -> dict[str, Any]:
    return (k8s.get("lmcc", "cache", ns) or {}).get("status") or {}


@pytest.fixture
def own_node(k8s_cluster: Cluster, namespace: str) -> Iterator[tuple[str, str, str]]:
    """A kwok node for this test alone: (name, its loopback IP, its label selector value)."""
    name = f"pool-{namespace}"
    address = f"127.0.{random.randint(1, 250)}.{random.randint(2, 250)}"
    node = {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                     "labels": {"kubernetes.io/hostname": name, "type": "kwok",
                                "lmcache-test/node": namespace}},
        "status": {
            "addresses": [{"type": "InternalIP", "address": address},
                          {"type": "Hostname", "address": name}],
            "allocatable": {"cpu": "100", "memory": "16Gi", "pods": "100"},
            "capacity": {"cpu": "100", "memory": "16Gi", "pods": "100"},
        },
    }  # fmt: skip
    k8s_cluster.kubectl("apply", "-f", "-", stdin=json.dumps(node))
    try:
        yield name, address, namespace
    finally:
        k8s_cluster.kubectl("delete", "node", name, "--wait=false", check=False)


def _store_chunks(endpoint: str, count: int) -> int:
    """Store ``count`` 1 MiB chunks into a real server (as a vLLM worker would)."""
    import torch
    from lmcache_node.client import NodeClient

    blocks = 2 * count  # 128-token blocks, 2 per 256-token chunk
    tensors = [torch.rand((blocks, 8, 128, 256)).to(torch.float16)]
    with NodeClient(endpoint, timeout_s=60, expected_chunk_size=256) as client:
        client.connect()
        registration = client.register_kv_caches(
            tensors, block_dim=0, block_size=128, layout="test-pools"
        )
        keys = [os.urandom(16) for _ in range(count)]
        return int(client.store(registration, keys, list(range(blocks))))


def test_a_real_servers_pool_is_read_and_reported_adopted_after_the_roll(
    k8s_cluster: Cluster, namespace: str, tmp_path: Path, own_node: tuple[str, str, str],
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    from lmcache_node.server.process import ServerProcess

    node, address, label = own_node
    port = next(_PORTS)
    shm_dir = Path("/dev/shm") / f"lmcache-test-{uuid.uuid4().hex[:10]}"
    args = ("--chunk-size", "256", "--cpu-buffer-size", "64Mi", "--max-workers", "1",
            "--shm-dir", str(shm_dir), "--http-host", f"127.0.0.1,{address}")  # fmt: skip
    servers = [ServerProcess(*args, http_port=port + 1, log_file=tmp_path / "server.log",
                             startup_timeout_s=300)]  # fmt: skip
    operator = OperatorProcess(
        k8s_cluster, namespace, tmp_path, ("--pool-probe-timeout", "120"), namespaced=False
    )
    try:
        servers[0].start()
        operator.start()
        k8s_cluster.apply(cluster("4Gi", port, {"lmcache-test/node": label}), namespace)

        def endpoint_pool() -> dict[str, Any] | None:
            endpoints = status(k8s_cluster, namespace).get("endpoints") or []
            return endpoints[0].get("pool") if endpoints and endpoints[0]["ready"] else None

        pool = wait_until(endpoint_pool, 120, "the pool the server reported")
        assert (pool["state"], pool["adoptedEntries"]) == ("created", 0), pool
        assert pool["capacityBytes"] == 64 * 2**20
        assert status(k8s_cluster, namespace)["poolNodes"] == [node]
        assert _store_chunks(servers[0].endpoint, 8) == 8
        # the cache pod's server stops (SIGTERM, as in a rollout: the pool stays) and a new
        # one starts on the same pool while the operator replaces the pod
        servers[0].terminate()
        k8s_cluster.apply(cluster("5Gi", port, {"lmcache-test/node": label}), namespace)
        servers.append(ServerProcess(*args, http_port=port + 1, log_file=tmp_path / "server.log",
                                     startup_timeout_s=300).start())  # fmt: skip

        def rolled() -> dict[str, Any] | None:
            st = status(k8s_cluster, namespace)
            rollout = st.get("rollout") or {}
            ok = st.get("observedGeneration") == 2 and rollout.get("state") == "Complete"
            return st if ok else None

        st = wait_until(rolled, 180, "the rollout of generation 2")
        (entry,) = st["rollout"]["nodes"]
        assert (entry["node"], entry["state"], entry["pool"]) == (node, "Updated", "adopted")
        assert entry["adoptedEntries"] == 8 and entry["adoptedBytes"] == 8 * 2**20, entry
        assert entry["seconds"] > 0
        (endpoint,) = st["endpoints"]
        assert endpoint["pool"]["state"] == "adopted" and endpoint["pool"]["entries"] == 8
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"--- operator log ---\n{operator.logs()}")
        operator.stop()
        for server in servers:
            server.kill()
        shutil.rmtree(shm_dir, ignore_errors=True)


def _events(k8s: Cluster, ns: str, reason: str) -> list[str]:
    items = k8s.items("events", ns)
    return [str(e.get("message")) for e in items if e.get("reason") == reason]


def test_a_deleted_persistent_cluster_waits_for_the_operator_to_clean_its_nodes(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    port = next(_PORTS)
    k8s_cluster.apply(cluster("4Gi", port, {"nvidia.com/gpu.present": "true"}), namespace)
    wait_until(
        lambda: (
            status(k8s_cluster, namespace).get("phase") == "Ready"
            and status(k8s_cluster, namespace).get("poolNodes") == ["gpu-0", "gpu-1"]
            and "lmcache.dev/pool-cleanup"
            in (
                (k8s_cluster.get("lmcc", "cache", namespace) or {})["metadata"].get("finalizers")
                or []
            )
        ),
        60,
        "Ready on 2 nodes with the finalizer",
    )
    operator.stop()
    k8s_cluster.kubectl("delete", "lmcc", "cache", "-n", namespace, "--wait=false")
    time.sleep(3)  # without the operator nothing happens: the pools would be left behind
    body = k8s_cluster.get("lmcc", "cache", namespace)
    assert body is not None and body["metadata"].get("deletionTimestamp")
    assert k8s_cluster.get("daemonset", "cache-cache", namespace) is not None
    operator.start()
    wait_until(lambda: k8s_cluster.get("lmcc", "cache", namespace) is None, 90, "the cluster gone")
    jobs = k8s_cluster.items("jobs", namespace, "lmcache.dev/pool-cleanup=cache")
    # owned by the cluster: garbage-collected after it; some may be gone already
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        assert pod["nodeName"] in ("gpu-0", "gpu-1")
        container = pod["containers"][0]
        assert container["command"] == [
            "lmcache-node", "pool", "remove", "--shm-dir",
            f"/dev/shm/lmcache-{namespace}.cache", "--wait-s", "60",
        ]  # fmt: skip
        assert pod["securityContext"]["runAsUser"] >= 1879048192  # the cluster's own user
        assert pod["volumes"][0]["hostPath"]["path"] == "/dev/shm"
        assert pod["automountServiceAccountToken"] is False
    (message,) = wait_until(
        lambda: _events(k8s_cluster, namespace, "PoolsRemoved"), 30, "the PoolsRemoved Event"
    )
    assert "removed the L1 pools" in message


def test_cleanup_that_cannot_finish_names_the_node_and_lets_the_cluster_go(
    k8s_cluster: Cluster, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    operator = OperatorProcess(k8s_cluster, namespace, tmp_path, ("--pool-cleanup-timeout", "8"))
    operator.start()
    try:
        port = next(_PORTS)
        k8s_cluster.apply(cluster("4Gi", port, {"nvidia.com/gpu.present": "true"}), namespace)
        wait_until(lambda: status(k8s_cluster, namespace).get("phase") == "Ready", 60, "Ready")
        # a node the cluster once ran on that is gone now: its Job never runs
        patch = {"status": {"poolNodes": ["gpu-0", "gpu-1", "ghost-node"]}}
        k8s_cluster.kubectl("patch", "lmcc", "cache", "-n", namespace, "--subresource=status",
                            "--type=merge", "-p", json.dumps(patch))  # fmt: skip
        wait_until(lambda: "ghost-node" in status(k8s_cluster, namespace)
                 .get("poolNodes", []), 30, "poolNodes kept")  # fmt: skip
        k8s_cluster.kubectl("delete", "lmcc", "cache", "-n", namespace, "--wait=false")
        wait_until(
            lambda: k8s_cluster.get("lmcc", "cache", namespace) is None, 60, "the cluster gone"
        )
        (message,) = wait_until(
            lambda: _events(k8s_cluster, namespace, "PoolCleanupIncomplete"),
            30,
            "the PoolCleanupIncomplete Event",
        )
        assert "ghost-node (running)" in message and "gpu-0" not in message, message
        assert f"lmcache-node pool remove --shm-dir /dev/shm/lmcache-{namespace}.cache" in message
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"--- operator log ---\n{operator.logs()}")
        operator.stop()


def test_memory_that_does_not_hold_pool_and_vllm_degrades_naming_the_node(
    k8s_cluster: Cluster, namespace: str, own_node: tuple[str, str, str],
    clusterwide_operator: OperatorProcess,
) -> None:  # fmt: skip
    node, _, label = own_node
    port = next(_PORTS)
    k8s_cluster.apply(cluster("8Gi", port, {"lmcache-test/node": label}), namespace)
    vllm = (
        "apiVersion: lmcache.dev/v1alpha1\nkind: VLLMDeployment\nmetadata: {name: llm}\n"
        "spec: {model: {name: m}, cache: {clusterRef: {name: cache}}, engine: {device: cpu},"
        " resources: {gpus: 0, memory: 5Gi}, replicas: 1,"
        f" placement: {{nodeSelector: {{lmcache-test/node: {label}}}}}}}\n"
    )
    k8s_cluster.apply(vllm, namespace)
    wait_until(
        lambda: (
            status(k8s_cluster, namespace).get("phase") == "Ready"
            and any(
                p["status"].get("phase") == "Running"
                for p in k8s_cluster.items("pods", namespace, "lmcache.dev/vllm-deployment=llm")
            )
        ),
        90,
        "Ready with the vLLM pod running",
    )
    # the node's allocatable memory shrinks below pool (8 GiB) + vLLM (5 GiB)
    patch = {"status": {"allocatable": {"memory": "12Gi"}}}
    k8s_cluster.kubectl("patch", "node", node, "--subresource=status", "--type=merge",
                        "-p", json.dumps(patch))  # fmt: skip

    def degraded() -> dict[str, Any] | None:
        st = status(k8s_cluster, namespace)
        return st if st.get("phase") == "Degraded" else None

    st = degraded_status = wait_until(degraded, 30, "Degraded")
    condition = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert condition["status"] == "True" and condition["reason"] == "MemoryOvercommitted"
    assert (
        f"{node}: the L1 pool (8.0 GiB) and the memory requests of its 1 vLLM pod(s) "
        in (condition["message"])
    ), degraded_status
    assert "exceed its allocatable memory (12.0 GiB)" in condition["message"]
    # room again: Ready
    patch = {"status": {"allocatable": {"memory": "16Gi"}}}
    k8s_cluster.kubectl("patch", "node", node, "--subresource=status", "--type=merge",
                        "-p", json.dumps(patch))  # fmt: skip
    wait_until(lambda: status(k8s_cluster, namespace).get("phase") == "Ready", 30, "Ready again")
