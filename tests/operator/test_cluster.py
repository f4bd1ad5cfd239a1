"""The operator against a real API server with kwok nodes (2 GPU, 1 CPU)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from lmcache_node.config import load_config

from tests.operator.conftest import OperatorProcess
from tests.operator.kubectl import Cluster, StatusRecorder
from tests.support import wait_until

pytestmark = pytest.mark.k8s

CLUSTER = """
apiVersion: lmcache.dev/v1alpha1
kind: LMCacheCluster
metadata:
  name: {name}
spec:
  image: {{repository: lmcache.local/node, tag: dev, pullPolicy: Never}}
  cache: {{cpuSize: {cpu}, persistent: {persistent}}}
  server: {{port: {port}, httpPort: {http_port}, eventsPort: {events_port}}}
"""
# hostNetwork pods claim their ports on the node: every cluster in the session gets its own.
_PORTS = itertools.count(20000, 3)


def manifest(
    name: str = "cache", cpu: str = "4Gi", port: int | None = None, *, persistent: bool = True
) -> str:
    port = next(_PORTS) if port is None else port
    return CLUSTER.format(
        name=name,
        cpu=cpu,
        port=port,
        http_port=port + 1,
        events_port=port + 2,
        persistent=str(persistent).lower(),
    )


def status(k8s: Cluster, ns: str, name: str = "cache") -> dict[str, Any]:
    obj = k8s.get("lmcc", name, ns)
    return (obj or {}).get("status") or {}


def wait_ready(
    k8s: Cluster, ns: str, name: str = "cache", nodes: int = 2, generation: int = 1
) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        st = status(k8s, ns, name)
        ok = (
            st.get("phase") == "Ready"
            and st.get("readyNodes") == nodes
            and st.get("observedGeneration") == generation
        )
        return st if ok else None

    return wait_until(ready, 30, f"{ns}/{name} Ready on {nodes} nodes at generation {generation}")


def condition(st: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in st["conditions"] if c["type"] == ctype)


# ---- API server validation (CEL and schema) -------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{server: {port: 8080}}", "server.port and server.httpPort must differ"),
        ("{server: {httpPort: 5556}}", "server.eventsPort must differ from server.port"),
        ("{cache: {cpuSize: '0'}}", "must be a quantity greater than zero"),
        (
            "{cache: {cpuSize: 1Gi, disk: {path: /d, size: '0'}}}",
            "must be a quantity greater than zero",
        ),
        ("{cache: {disk: {path: /d}}}", "cache.disk.size is required with a disk tier"),
        ("{cache: {remote: {serde: lz4}}}", "set exactly one of cache.remote.url"),
        (
            "{cache: {remote: {url: 'redis://r:6379', urlSecretRef: {name: s, key: k}}}}",
            "set exactly one of cache.remote.url",
        ),
        ("{updateStrategy: {maxSurge: 1}}", "maxSurge is not allowed with hostNetwork"),
        ("{cache: {cpuSize: 4GB}}", "spec.cache.cpuSize"),
        ("{cach: {}}", 'unknown field "spec.cach"'),
    ],
)
def test_api_server_rejects_invalid_resources(
    k8s_cluster: Cluster, namespace: str, spec: str, message: str
) -> None:
    doc = (
        "apiVersion: lmcache.dev/v1alpha1\nkind: LMCacheCluster\n"
        f"metadata: {{name: bad}}\nspec: {spec}\n"
    )
    result = k8s_cluster.apply(doc, namespace, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert k8s_cluster.get("lmcc", "bad", namespace) is None


def test_explain_shows_field_descriptions(k8s_cluster: Cluster) -> None:
    out = k8s_cluster.kubectl("explain", "lmcc.spec.cache.cpuSize").stdout
    assert "Size of the CPU memory tier (L1) per node" in out


# ---- reconciliation ---------------------------------------------------------------------------


def test_apply_creates_children_and_reaches_ready(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    k8s_cluster.apply(manifest(cpu="3Gi", port=5555), namespace)
    st = wait_ready(k8s_cluster, namespace)
    assert st["desiredNodes"] == 2 and st["updatedNodes"] == 2 and st["unavailableNodes"] == 0
    assert sorted(e["node"] for e in st["endpoints"]) == ["gpu-0", "gpu-1"]
    assert all(e["ready"] and e["port"] == 5555 for e in st["endpoints"])
    assert condition(st, "ConfigValid")["status"] == "True"
    assert condition(st, "Available")["status"] == "True"

    owner = k8s_cluster.get("lmcc", "cache", namespace)
    assert owner is not None
    # a persistent pool (the default) outlives its pods: the cluster waits for its cleanup
    assert owner["metadata"].get("finalizers") == ["lmcache.dev/pool-cleanup"]
    uid = owner["metadata"]["uid"]

    cm = k8s_cluster.get("configmap", "cache-cache-config", namespace)
    assert cm is not None
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cm["data"]["config.yaml"])
    config = load_config(config_file=config_file, environ={})
    assert config.max_local_cpu_size == 3.0 and config.port == 5555

    ds = k8s_cluster.get("daemonset", "cache-cache", namespace)
    assert ds is not None
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"name": "shm", "hostPath": {"path": "/dev/shm", "type": "Directory"}} in pod["volumes"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # the 3 GiB pool, its index rounded up to 2 MiB, and 2 GiB for the server
    assert container["resources"]["requests"]["memory"] == "5122Mi"
    assert "lmcache.dev/config-hash" in ds["spec"]["template"]["metadata"]["annotations"]
    raw = k8s_cluster.kubectl(
        "get", "ds", "cache-cache", "-n", namespace, "-o", "json", "--show-managed-fields"
    ).stdout
    managers = {m["manager"] for m in json.loads(raw)["metadata"]["managedFields"]}
    assert "lmcache-operator" in managers

    for kind, name in [
        ("configmap", "cache-cache-config"),
        ("service", "cache-cache"),
        ("service", "cache-cache-metrics"),
        ("daemonset", "cache-cache"),
    ]:
        obj = k8s_cluster.get(kind, name, namespace)
        assert obj is not None, f"{kind}/{name} missing"
        refs = obj["metadata"]["ownerReferences"]
        assert [(r["kind"], r["uid"], r["controller"]) for r in refs] == [
            ("LMCacheCluster", uid, True)
        ]
    svc = k8s_cluster.get("service", "cache-cache", namespace)
    assert svc is not None and svc["spec"]["internalTrafficPolicy"] == "Local"
    metrics = k8s_cluster.get("service", "cache-cache-metrics", namespace)
    assert metrics is not None and metrics["spec"]["clusterIP"] == "None"

    pods = k8s_cluster.items("pods", namespace, "lmcache.dev/cluster=cache")
    assert sorted(p["spec"]["nodeName"] for p in pods) == ["gpu-0", "gpu-1"]  # never cpu-0
    assert all(p["status"]["phase"] == "Running" for p in pods)

    printed = k8s_cluster.kubectl("get", "lmcc", "-n", namespace).stdout.split()
    assert printed[:6] == ["NAME", "READY", "DESIRED", "PHASE", "PORT", "CACHE"]
    assert printed[7:12] == ["cache", "2", "2", "Ready", "5555"]


def _fake_gpu_node(name: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "type": "kwok",
                    "nvidia.com/gpu.present": "true",
                },
            },
            "status": {
                "allocatable": {"cpu": "1000", "memory": "16Ti", "pods": "1000"},
                "capacity": {"cpu": "1000", "memory": "16Ti", "pods": "1000"},
            },
        }
    )


def test_nodes_joining_and_leaving_follow_in_status(
    k8s_cluster: Cluster, namespace: str, clusterwide_operator: OperatorProcess
) -> None:
    """Node watches: all-namespaces mode (the chart's ClusterRole grants nodes)."""
    k8s_cluster.apply(manifest(), namespace)
    wait_ready(k8s_cluster, namespace)
    node = f"gpu-x-{namespace}"
    try:
        k8s_cluster.kubectl("apply", "-f", "-", stdin=_fake_gpu_node(node))
        st = wait_ready(k8s_cluster, namespace, nodes=3)
        assert st["desiredNodes"] == 3
        assert node in [e["node"] for e in st["endpoints"]]
    finally:
        k8s_cluster.kubectl("delete", "node", node, "--wait=false", check=False)
    # Kubernetes itself only drops the pod ~40 s later (pod GC); the status says it at once.
    st = wait_until(
        lambda: (
            (s := status(k8s_cluster, namespace)).get("phase") == "Degraded"
            and f"{node} (node deleted)" in condition(s, "Degraded")["message"]
            and s
        ),
        10,
        "Degraded naming the deleted node",
    )
    assert [e["ready"] for e in st["endpoints"] if e["node"] == node] == [False]


NOT_READY = {
    "status": {
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "TestMadeNotReady",
                "message": "made NotReady by a test",
                "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ]
    }
}


def test_node_not_ready_shows_degraded_with_the_node_then_ready(
    k8s_cluster: Cluster, namespace: str, clusterwide_operator: OperatorProcess
) -> None:
    """Node watches: all-namespaces mode (the chart's ClusterRole grants nodes)."""
    k8s_cluster.apply(manifest(), namespace)
    wait_ready(k8s_cluster, namespace)
    node = "gpu-1"
    # kwok keeps its nodes Ready: take gpu-1 out of its hands, mark it NotReady, hand it back.
    k8s_cluster.kubectl("annotate", "node", node, "kwok.x-k8s.io/node-")
    try:
        k8s_cluster.kubectl(
            "patch",
            "node",
            node,
            "--subresource=status",
            "--type=strategic",
            "-p",
            json.dumps(NOT_READY),
        )
        st = wait_until(
            lambda: (s := status(k8s_cluster, namespace)).get("phase") == "Degraded" and s,
            10,
            "Degraded naming the NotReady node",
        )
        assert f"{node} (node NotReady)" in condition(st, "Degraded")["message"]
    finally:
        k8s_cluster.kubectl("annotate", "node", node, "kwok.x-k8s.io/node=fake", "--overwrite")
    wait_ready(k8s_cluster, namespace)


def test_deleted_cache_pod_shows_degraded_with_the_node_then_ready(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    k8s_cluster.apply(manifest(), namespace)
    wait_ready(k8s_cluster, namespace)
    pods = k8s_cluster.items("pods", namespace, "lmcache.dev/cluster=cache")
    victim = pods[0]
    node = victim["spec"]["nodeName"]
    with StatusRecorder(k8s_cluster, namespace, "cache") as recorder:
        recorder.wait("the current status", lambda s: s.get("phase") == "Ready")
        k8s_cluster.kubectl(
            "delete", "pod", victim["metadata"]["name"], "-n", namespace, "--wait=false"
        )

        def degraded_naming_node(s: dict[str, Any]) -> bool:
            if s.get("phase") != "Degraded":
                return False
            message = condition(s, "Degraded")["message"]
            return node in message or "without a cache pod" in message

        degraded = recorder.wait("Degraded naming the node", degraded_naming_node)
        assert condition(degraded, "Degraded")["status"] == "True"
        index = recorder.seen.index(degraded)
        recorder.wait(
            "Ready again",
            lambda s: (
                s.get("phase") == "Ready"
                and recorder.seen.index(s) > index
                and s["readyNodes"] == 2
            ),
        )
    new_pods = k8s_cluster.items("pods", namespace, "lmcache.dev/cluster=cache")
    assert victim["metadata"]["name"] not in [p["metadata"]["name"] for p in new_pods]


def test_spec_change_rolls_the_daemonset_and_status_follows(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    k8s_cluster.apply(manifest(cpu="4Gi", port=7000), namespace)
    wait_ready(k8s_cluster, namespace)
    before = k8s_cluster.get("daemonset", "cache-cache", namespace)
    assert before is not None
    old_hash = before["spec"]["template"]["metadata"]["annotations"]["lmcache.dev/config-hash"]
    old_pods = {
        p["metadata"]["name"]
        for p in k8s_cluster.items("pods", namespace, "lmcache.dev/cluster=cache")
    }
    with StatusRecorder(k8s_cluster, namespace, "cache") as recorder:
        k8s_cluster.apply(manifest(cpu="6Gi", port=7100), namespace)
        st = wait_ready(k8s_cluster, namespace, generation=2)
        # status never claimed Ready for generation 2 before the pods were replaced
        for seen in recorder.seen:
            if seen.get("observedGeneration") == 2 and seen.get("phase") == "Ready":
                assert seen["updatedNodes"] == 2
    assert [e["port"] for e in st["endpoints"]] == [7100, 7100]
    after = k8s_cluster.get("daemonset", "cache-cache", namespace)
    assert after is not None
    assert (
        after["spec"]["template"]["metadata"]["annotations"]["lmcache.dev/config-hash"] != old_hash
    )
    container = after["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["memory"] == "8194Mi"  # the 6 GiB pool + 2 GiB
    assert container["ports"][0]["containerPort"] == 7100
    cm = k8s_cluster.get("configmap", "cache-cache-config", namespace)
    assert cm is not None
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert (config["max_local_cpu_size"], config["port"]) == (6.0, 7100)
    new_pods = {
        p["metadata"]["name"]
        for p in k8s_cluster.items("pods", namespace, "lmcache.dev/cluster=cache")
    }
    assert new_pods.isdisjoint(old_pods)


def test_deleting_the_cluster_removes_children_even_with_the_operator_stopped(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    # without a persistent pool nothing outlives the pods: no finalizer (a persistent
    # cluster waits for the operator to clean its nodes: test_pools.py)
    k8s_cluster.apply(manifest(persistent=False), namespace)
    wait_ready(k8s_cluster, namespace)
    body = k8s_cluster.get("lmcc", "cache", namespace)
    assert body is not None and not body["metadata"].get("finalizers")
    operator.stop()
    k8s_cluster.kubectl("delete", "lmcc", "cache", "-n", namespace, "--timeout=30s")

    def children_gone() -> bool:
        return all(
            k8s_cluster.get(kind, name, namespace) is None
            for kind, name in [
                ("daemonset", "cache-cache"),
                ("configmap", "cache-cache-config"),
                ("service", "cache-cache"),
                ("service", "cache-cache-metrics"),
            ]
        )

    wait_until(children_gone, 60, "garbage collection of the children")


def test_invalid_spec_sets_config_valid_false_and_an_event_then_recovers(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    doc = manifest(cpu="8Gi", port=7200) + "  resources: {limits: {memory: 4Gi}}\n"
    k8s_cluster.apply(doc, namespace)
    st = wait_until(
        lambda: (s := status(k8s_cluster, namespace)).get("phase") == "Failed" and s,
        30,
        "ConfigValid=False",
    )
    valid = condition(st, "ConfigValid")
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert "resources.limits.memory 4Gi is below cache.cpuSize 8Gi" in valid["message"]
    assert k8s_cluster.get("daemonset", "cache-cache", namespace) is None

    def warning_event() -> list[Any]:
        events = k8s_cluster.items("events", namespace)
        return [
            e
            for e in events
            if e.get("reason") == "InvalidSpec" and "below cache.cpuSize" in e["message"]
        ]

    events = wait_until(warning_event, 30, "an InvalidSpec Event")
    assert sum(e.get("count", 1) for e in events) <= 3  # no retry storm
    k8s_cluster.apply(manifest(cpu="8Gi", port=7200), namespace)  # drops the bad resources
    st = wait_ready(k8s_cluster, namespace, generation=2)
    assert condition(st, "ConfigValid")["status"] == "True"


def test_service_monitor_condition_says_why_it_is_missing(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    k8s_cluster.apply(manifest() + "  monitoring: {serviceMonitor: true}\n", namespace)
    st = wait_ready(k8s_cluster, namespace)
    monitor = condition(st, "ServiceMonitorReady")
    assert monitor["status"] == "False" and monitor["reason"] == "CRDNotInstalled"


def test_operator_restart_mid_reconcile_creates_no_duplicates_and_keeps_status(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    names = [f"c{i}" for i in range(5)]
    docs = {n: manifest(name=n) for n in names}
    k8s_cluster.apply("---".join(docs[n] for n in names[:2]), namespace)
    for name in names[:2]:
        wait_ready(k8s_cluster, namespace, name)
    with StatusRecorder(k8s_cluster, namespace, "c0") as recorder:
        k8s_cluster.apply("---".join(docs.values()), namespace)
        operator.stop(kill=True)  # mid-reconcile of the new ones
        operator.start()
        for name in names:
            wait_ready(k8s_cluster, namespace, name)
        assert set(recorder.phases()) == {"Ready"}  # the ready one never regressed
    daemonsets = k8s_cluster.items("daemonsets", namespace)
    assert sorted(d["metadata"]["name"] for d in daemonsets) == sorted(f"{n}-cache" for n in names)
    # a config, a public-key and a connection ConfigMap, two credential Secrets per cluster
    # (a cluster killed between creating its Secrets and recording their keys gets a new pair)
    selector = "app.kubernetes.io/name=lmcache-node"
    configmaps = k8s_cluster.items("configmaps", namespace, selector)
    assert sorted(c["metadata"]["name"] for c in configmaps) == sorted(
        f"{n}-{kind}" for n in names for kind in ("cache-config", "cache-keys", "connection")
    )
    assert len(k8s_cluster.items("secrets", namespace, selector)) == 10
    assert len(k8s_cluster.items("services", namespace)) == 10
    pods = k8s_cluster.items("pods", namespace, "app.kubernetes.io/name=lmcache-node")
    assert len(pods) == 10
    annotations = k8s_cluster.get("lmcc", "c4", namespace)["metadata"]["annotations"]  # type: ignore[index]
    assert not any(k.startswith("kopf.zalando.org") for k in annotations)
    assert "lmcache.dev/last-handled-configuration" in annotations
