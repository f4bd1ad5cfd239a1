"""VLLMDeployment against a real API server with kwok nodes (gpu-0, gpu-1 and cpu-0)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.operator.conftest import OperatorProcess
from tests.operator.kubectl import Cluster
from tests.support import wait_until

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[2]
CACHE = """
apiVersion: lmcache.dev/v1alpha1
kind: LMCacheCluster
metadata: {{name: cache}}
spec:
  image: {{repository: lmcache.local/node, tag: dev, pullPolicy: Never}}
  server: {{port: {port}, eventsPort: {events_port}, chunkSize: 256}}
"""
VLLM = """
apiVersion: lmcache.dev/v1alpha1
kind: VLLMDeployment
metadata: {{name: llm}}
spec:
  model: {{name: org/model}}
  replicas: {replicas}
  resources: {{gpus: {gpus}}}
  cache: {{clusterRef: {{name: cache}}}}
"""
POD_SELECTOR = "lmcache.dev/vllm-deployment=llm"


def cache_manifest(port: int = 5555) -> str:
    return CACHE.format(port=port, events_port=port + 2)


def vllm_manifest(replicas: int = 2, gpus: int = 1) -> str:
    return VLLM.format(replicas=replicas, gpus=gpus)


def vllm_status(k8s: Cluster, ns: str, name: str = "llm") -> dict[str, Any]:
    return (k8s.get("vllmd", name, ns) or {}).get("status") or {}


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), {})


def wait_cache_ready(k8s: Cluster, ns: str) -> None:
    def ready() -> bool:
        st = (k8s.get("lmcc", "cache", ns) or {}).get("status") or {}
        return st.get("phase") == "Ready" and st.get("readyNodes") == 2

    wait_until(ready, 60, "the LMCacheCluster Ready on 2 nodes")


def wait_vllm(
    k8s: Cluster, ns: str, what: str, predicate: Any, *, timeout: float = 60, name: str = "llm"
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        st = vllm_status(k8s, ns, name)
        return st if st and predicate(st) else None

    return wait_until(probe, timeout, f"VLLMDeployment {name} {what}")


def cache_pod_on(k8s: Cluster, ns: str, node: str) -> str:
    pods = k8s.items("pods", ns, "lmcache.dev/cluster=cache")
    return str(next(p["metadata"]["name"] for p in pods if p["spec"].get("nodeName") == node))


def set_ready(k8s: Cluster, ns: str, pod: str, ready: bool) -> None:
    """Flip a pod's Ready condition (kwok runs nothing, so this is how a cache 'stops')."""
    obj = k8s.get("pod", pod, ns)
    assert obj is not None
    conditions = obj["status"]["conditions"]
    index = next(i for i, c in enumerate(conditions) if c["type"] == "Ready")
    patch = [
        {
            "op": "replace",
            "path": f"/status/conditions/{index}/status",
            "value": "True" if ready else "False",
        }
    ]
    k8s.kubectl(
        "patch",
        "pod",
        pod,
        "-n",
        ns,
        "--subresource=status",
        "--type=json",
        "-p",
        json.dumps(patch),
    )


def running_pods(k8s: Cluster, ns: str) -> list[dict[str, Any]]:
    pods = k8s.items("pods", ns, POD_SELECTOR)
    return [
        p
        for p in pods
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]


# ---- validation by the API server (CEL and schema) ---------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "{model: {name: m}, cache: {enabled: false}, parallelism: {tensor: 2},"
            " resources: {gpus: 1}}",
            "resources.gpus must be at least parallelism.tensor x parallelism.pipeline",
        ),
        (
            "{model: {name: m}, cache: {clusterRef: {name: c}},"
            " engine: {extraArgs: ['--kv-transfer-config={}']}}",
            "engine.extraArgs must not contain --kv-transfer-config while cache.enabled",
        ),
        ("{model: {name: m}, cache: {enabled: false}, replicas: -1}", "replicas must be 0 or more"),
        ("{model: {name: m}}", "cache.clusterRef is required while cache.enabled is true"),
        ("{cache: {enabled: false}}", "spec.model: Required value"),
        (
            "{model: {name: m}, cache: {enabled: false}, engine: {device: tpu}}",
            "spec.engine.device",
        ),
    ],
)
def test_api_server_rejects_invalid_vllm_deployments(
    k8s_cluster: Cluster, namespace: str, spec: str, message: str
) -> None:
    doc = (
        "apiVersion: lmcache.dev/v1alpha1\nkind: VLLMDeployment\n"
        f"metadata: {{name: bad}}\nspec: {spec}\n"
    )
    result = k8s_cluster.apply(doc, namespace, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert k8s_cluster.get("vllmd", "bad", namespace) is None


def test_cpu_without_gpus_is_accepted(k8s_cluster: Cluster, namespace: str) -> None:
    doc = (
        "apiVersion: lmcache.dev/v1alpha1\nkind: VLLMDeployment\nmetadata: {name: ok}\n"
        "spec: {model: {name: m}, cache: {enabled: false}, engine: {device: cpu}, "
        "resources: {gpus: 0}, parallelism: {tensor: 2}}\n"
    )
    k8s_cluster.apply(doc, namespace)
    assert k8s_cluster.get("vllmd", "ok", namespace) is not None
    out = k8s_cluster.kubectl("explain", "vllmd.spec.cache.kvRole").stdout
    assert "kv_producer (store only: prefill)" in out


# ---- reconciliation ------------------------------------------------------------------------


def test_pods_start_only_where_the_cache_is_ready_and_are_wired_to_it(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    k8s_cluster.apply(cache_manifest(), namespace)
    wait_cache_ready(k8s_cluster, namespace)
    set_ready(k8s_cluster, namespace, cache_pod_on(k8s_cluster, namespace, "gpu-1"), False)
    # 4 GPUs each: gpu-0 (8 GPUs) fits two replicas; the third must wait for gpu-1's cache.
    k8s_cluster.apply(vllm_manifest(replicas=3, gpus=4), namespace)
    st = wait_vllm(
        k8s_cluster, namespace, "2 ready replicas", lambda s: s.get("readyReplicas") == 2
    )
    assert condition(st, "Ready")["status"] == "False"
    pods = k8s_cluster.items("pods", namespace, POD_SELECTOR)
    assert len(pods) == 3
    assert sorted(str(p["spec"].get("nodeName")) for p in pods) == ["None", "gpu-0", "gpu-0"]

    # the live objects are wired as built
    pod = running_pods(k8s_cluster, namespace)[0]
    spec = pod["spec"]
    assert not spec.get("schedulingGates")
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-0"]}]}
    ]
    container = spec["containers"][0]
    assert container["env"][0] == {
        "name": "HOST_IP",
        "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.hostIP"}},
    }
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PYTHONHASHSEED"] == "0" and env["PYTHONPATH"] == "/opt/lmcache-connector"
    assert (env["LMCACHE_NODE_PORT"], env["LMCACHE_CHUNK_SIZE"]) == ("5555", "256")
    args = container["args"]
    config = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert config["kv_connector"] == "LMCacheNodeConnector"
    assert config["kv_connector_module_path"] == "lmcache_node.vllm.connector"
    assert config["kv_connector_extra_config"] == {
        "lmcache.node.host": "tcp://$(HOST_IP)",
        "lmcache.node.port": 5555,
        "lmcache.node.chunk_size": 256,
    }
    assert container["command"] == ["vllm", "serve"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["hostPath"] == {"path": "/dev/shm", "type": "Directory"}
    init = {c["name"]: c for c in spec["initContainers"]}
    assert init["install-connector"]["image"] == "lmcache.local/node:dev"
    assert init["wait-for-cache"]["command"][-1] == "http://$(HOST_IP):8080/readyz"
    owner = pod["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "ReplicaSet"

    # gpu-1's cache comes back: the waiting replica is placed there
    set_ready(k8s_cluster, namespace, cache_pod_on(k8s_cluster, namespace, "gpu-1"), True)
    st = wait_vllm(
        k8s_cluster,
        namespace,
        "Ready with 3 replicas",
        lambda s: condition(s, "Ready").get("status") == "True" and s.get("readyReplicas") == 3,
    )
    nodes = sorted(p["spec"]["nodeName"] for p in running_pods(k8s_cluster, namespace))
    assert nodes == ["gpu-0", "gpu-0", "gpu-1"]
    assert condition(st, "CacheReady")["status"] == "True"
    assert condition(st, "CacheCompatible")["status"] == "True"
    assert st["cache"]["clusterRef"] == "cache" and st["cache"]["compatible"] is True
    assert st["selector"] == "app.kubernetes.io/name=vllm,lmcache.dev/vllm-deployment=llm"
    assert st["url"] == f"http://llm.{namespace}.svc:8000/v1"
    printed = k8s_cluster.kubectl("get", "vllmd", "-n", namespace).stdout.split()
    assert printed[:6] == ["NAME", "READY", "REPLICAS", "MODEL", "CACHE", "AGE"]
    assert printed[6:11] == ["llm", "3", "3", "org/model", "Ready"]
    service = k8s_cluster.get("service", "llm", namespace)
    assert service is not None and service["spec"]["ports"][0]["port"] == 8000
    cache_status = (k8s_cluster.get("lmcc", "cache", namespace) or {}).get("status") or {}
    assert cache_status.get("consumers") == ["llm"]


def test_cache_ready_follows_the_cluster_with_the_node_named(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    k8s_cluster.apply(cache_manifest(), namespace)
    wait_cache_ready(k8s_cluster, namespace)
    k8s_cluster.apply(vllm_manifest(replicas=2), namespace)
    wait_vllm(
        k8s_cluster, namespace, "Ready", lambda s: condition(s, "Ready").get("status") == "True"
    )
    node = running_pods(k8s_cluster, namespace)[0]["spec"]["nodeName"]
    cache_pod = cache_pod_on(k8s_cluster, namespace, node)
    set_ready(k8s_cluster, namespace, cache_pod, False)
    st = wait_vllm(
        k8s_cluster,
        namespace,
        f"CacheReady=False naming {node}",
        lambda s: s.get("cache", {}).get("nodesWithoutReadyCache") == [node],
    )
    cache = condition(st, "CacheReady")
    assert (cache["status"], cache["reason"]) == ("False", "NodesWithoutReadyCache")
    assert node in cache["message"] and st["cache"]["state"] == "Degraded"
    set_ready(k8s_cluster, namespace, cache_pod, True)
    st = wait_vllm(
        k8s_cluster,
        namespace,
        "CacheReady=True again",
        lambda s: condition(s, "CacheReady").get("status") == "True",
    )
    assert st["cache"]["nodesWithoutReadyCache"] == [] and st["cache"]["state"] == "Ready"

    # a crash-looping replica is named in ReplicaFailure
    victim = running_pods(k8s_cluster, namespace)[0]["metadata"]["name"]
    crash = [
        {
            "op": "replace",
            "path": "/status/containerStatuses/0/state",
            "value": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
        }
    ]
    k8s_cluster.kubectl(
        "patch", "pod", victim, "-n", namespace, "--subresource=status", "--type=json",
        "-p", json.dumps(crash),
    )  # fmt: skip
    st = wait_vllm(
        k8s_cluster,
        namespace,
        "ReplicaFailure naming the pod",
        lambda s: condition(s, "ReplicaFailure").get("status") == "True",
    )
    failure = condition(st, "ReplicaFailure")
    assert failure["reason"] == "CrashLoopBackOff"
    assert f"pod {victim}: vllm CrashLoopBackOff" in failure["message"]


def test_kubectl_scale_and_cluster_changes_roll_the_pods(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    k8s_cluster.apply(cache_manifest(), namespace)
    wait_cache_ready(k8s_cluster, namespace)
    k8s_cluster.apply(vllm_manifest(replicas=1), namespace)
    wait_vllm(k8s_cluster, namespace, "1 ready replica", lambda s: s.get("readyReplicas") == 1)
    k8s_cluster.kubectl("scale", "vllmd/llm", "-n", namespace, "--replicas=3")
    wait_vllm(
        k8s_cluster,
        namespace,
        "3 ready replicas after kubectl scale",
        lambda s: s.get("readyReplicas") == 3 and s.get("replicas") == 3,
    )
    scale = json.loads(
        k8s_cluster.kubectl(
            "get", "vllmd", "llm", "-n", namespace, "--subresource=scale", "-o", "json"
        ).stdout
    )
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3
    assert scale["status"]["selector"] == (
        "app.kubernetes.io/name=vllm,lmcache.dev/vllm-deployment=llm"
    )
    old = {p["metadata"]["name"] for p in running_pods(k8s_cluster, namespace)}
    deployment = k8s_cluster.get("deployment", "llm", namespace)
    assert deployment is not None
    old_hash = deployment["spec"]["template"]["metadata"]["annotations"]["lmcache.dev/config-hash"]

    k8s_cluster.apply(cache_manifest(port=6000), namespace)  # a connection setting changes

    def rolled() -> list[dict[str, Any]] | None:
        pods = running_pods(k8s_cluster, namespace)
        names = {p["metadata"]["name"] for p in pods}
        fresh = len(pods) == 3 and names.isdisjoint(old)
        return pods if fresh else None

    pods = wait_until(rolled, 90, "the vLLM pods replaced after the port change")
    for pod in pods:
        args = pod["spec"]["containers"][0]["args"]
        config = json.loads(args[args.index("--kv-transfer-config") + 1])
        assert config["kv_connector_extra_config"]["lmcache.node.port"] == 6000
    deployment = k8s_cluster.get("deployment", "llm", namespace)
    assert deployment is not None
    assert (
        deployment["spec"]["template"]["metadata"]["annotations"]["lmcache.dev/config-hash"]
        != old_hash
    )


def test_deleting_the_cluster_gives_a_clear_reason_and_no_crash(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    k8s_cluster.apply(cache_manifest(), namespace)
    wait_cache_ready(k8s_cluster, namespace)
    k8s_cluster.apply(vllm_manifest(replicas=1), namespace)
    wait_vllm(
        k8s_cluster, namespace, "Ready", lambda s: condition(s, "Ready").get("status") == "True"
    )
    k8s_cluster.kubectl("delete", "lmcc", "cache", "-n", namespace, "--timeout=30s")
    st = wait_vllm(
        k8s_cluster,
        namespace,
        "CacheReady=False ClusterNotFound",
        lambda s: condition(s, "CacheReady").get("reason") == "ClusterNotFound",
    )
    assert "LMCacheCluster 'cache' does not exist" in condition(st, "CacheReady")["message"]
    assert st["cache"]["state"] == "NotFound"
    assert k8s_cluster.get("deployment", "llm", namespace) is not None  # keeps serving
    assert operator.proc is not None and operator.proc.poll() is None
    wait_until(
        lambda: not k8s_cluster.items("pods", namespace, "lmcache.dev/cluster=cache"),
        120,
        "garbage collection of the cache pods",
    )
    k8s_cluster.kubectl("scale", "vllmd/llm", "-n", namespace, "--replicas=2")

    def new_replica_waits() -> bool:  # Required colocation: no ready cache, no scheduling
        deployment = k8s_cluster.get("deployment", "llm", namespace) or {}
        pods = k8s_cluster.items("pods", namespace, POD_SELECTOR)
        gated = [p for p in pods if p["spec"].get("schedulingGates")]
        return deployment.get("spec", {}).get("replicas") == 2 and len(gated) == 1

    wait_until(new_replica_waits, 30, "the Deployment scaled to 2 with the new replica gated")
    assert vllm_status(k8s_cluster, namespace)["readyReplicas"] == 1
    k8s_cluster.apply(cache_manifest(), namespace)
    st = wait_vllm(
        k8s_cluster,
        namespace,
        "Ready with 2 replicas after the cluster is back",
        lambda s: condition(s, "Ready").get("status") == "True" and s.get("readyReplicas") == 2,
    )
    assert condition(st, "CacheReady")["status"] == "True"
    assert "Traceback" not in operator.logs()


def test_vllm_deployment_waits_for_a_cluster_created_later(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    k8s_cluster.apply(vllm_manifest(replicas=1), namespace)
    st = wait_vllm(
        k8s_cluster,
        namespace,
        "waiting for its cluster",
        lambda s: condition(s, "Ready").get("reason") == "WaitingForCacheCluster",
    )
    assert condition(st, "CacheReady")["reason"] == "ClusterNotFound"
    assert k8s_cluster.get("deployment", "llm", namespace) is None
    k8s_cluster.apply(cache_manifest(), namespace)
    wait_vllm(
        k8s_cluster, namespace, "Ready", lambda s: condition(s, "Ready").get("status") == "True"
    )


def test_producer_consumer_example_reconciles(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    text = (REPO / "manifests" / "examples" / "vllmdeployment-disaggregated.yaml").read_text()
    docs = list(yaml.safe_load_all(text))
    for doc in docs:
        if doc["kind"] == "LMCacheCluster":  # nothing can be pulled here
            doc["spec"]["image"] = {
                "repository": "lmcache.local/node",
                "tag": "dev",
                "pullPolicy": "Never",
            }
    k8s_cluster.apply(yaml.safe_dump_all(docs), namespace)
    for name, role in (("pd-prefill", "kv_producer"), ("pd-decode", "kv_consumer")):
        st = wait_vllm(
            k8s_cluster,
            namespace,
            "Ready",
            lambda s: condition(s, "Ready").get("status") == "True",
            name=name,
        )
        assert condition(st, "CacheReady")["status"] == "True"
        pods = k8s_cluster.items("pods", namespace, f"lmcache.dev/vllm-deployment={name}")
        assert len(pods) == 1
        args = pods[0]["spec"]["containers"][0]["args"]
        config = json.loads(args[args.index("--kv-transfer-config") + 1])
        assert config["kv_role"] == role
    proxy = k8s_cluster.get("deployment", "pd-proxy", namespace)
    assert proxy is not None
    wait_until(
        lambda: (
            ((k8s_cluster.get("lmcc", "pd-cache", namespace) or {}).get("status") or {}).get(
                "consumers"
            )
            == ["pd-decode", "pd-prefill"]
        ),
        30,
        "the LMCacheCluster listing both consumers",
    )


@pytest.mark.parametrize(
    "example",
    sorted((REPO / "manifests" / "examples").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_examples_validate_on_the_api_server(
    k8s_cluster: Cluster, namespace: str, example: Path
) -> None:
    result = k8s_cluster.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", str(example), check=False
    )
    assert result.returncode == 0, result.stderr
    assert "(server dry run)" in result.stdout


def test_operator_restart_lifts_gates_of_pods_created_while_it_was_down(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    k8s_cluster.apply(cache_manifest(), namespace)
    wait_cache_ready(k8s_cluster, namespace)
    k8s_cluster.apply(vllm_manifest(replicas=1), namespace)
    wait_vllm(
        k8s_cluster, namespace, "Ready", lambda s: condition(s, "Ready").get("status") == "True"
    )
    operator.stop(kill=True)
    k8s_cluster.kubectl("scale", "vllmd/llm", "-n", namespace, "--replicas=3")
    k8s_cluster.kubectl(  # what the operator would do, to get gated pods while it is down
        "patch", "deployment", "llm", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"replicas": 3}}),
    )  # fmt: skip

    def gated() -> bool:
        pods = k8s_cluster.items("pods", namespace, POD_SELECTOR)
        return len([p for p in pods if p["spec"].get("schedulingGates")]) == 2

    wait_until(gated, 30, "two gated replicas while the operator is down")
    operator.start()
    st = wait_vllm(
        k8s_cluster,
        namespace,
        "3 ready replicas after the restart",
        lambda s: s.get("readyReplicas") == 3 and condition(s, "Ready").get("status") == "True",
    )
    assert condition(st, "CacheReady")["status"] == "True"
    deployments = k8s_cluster.items("deployments", namespace)
    assert [d["metadata"]["name"] for d in deployments] == ["llm"]


def test_a_name_that_cannot_name_the_service_sets_config_valid_false(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    doc = vllm_manifest(replicas=1).replace("name: llm", "name: 9llm")
    k8s_cluster.apply(doc, namespace)
    st = wait_vllm(
        k8s_cluster,
        namespace,
        "ConfigValid=False",
        lambda s: condition(s, "ConfigValid").get("status") == "False",
        name="9llm",
    )
    valid = condition(st, "ConfigValid")
    assert valid["reason"] == "InvalidSpec" and "must be a DNS-1035 label" in valid["message"]
    assert condition(st, "Ready")["status"] == "False"
    assert k8s_cluster.get("deployment", "9llm", namespace) is None

    def warning_event() -> list[Any]:
        events = k8s_cluster.items("events", namespace)
        return [
            e for e in events if e.get("reason") == "InvalidSpec" and "DNS-1035" in e["message"]
        ]

    events = wait_until(warning_event, 30, "an InvalidSpec Event")
    assert sum(e.get("count", 1) for e in events) <= 3  # no retry storm
