"""The chart, the operator and the cache server together on a real Kubernetes node.

The tests run in file order and build on each other (one install, one cache cluster, one
VLLMDeployment): install -> LMCacheCluster Ready -> cache pod serves on the node's IP ->
VLLMDeployment Ready, the same prompt twice (the second served by the node cache) -> cache
pod deleted and back (Degraded -> Ready, vLLM answers throughout and hits again) -> a plain
Deployment of the vLLM image, wired by the operator's webhook, hits the same cache -> RBAC
sufficient (all of that done by the operator) and minimal -> helm upgrade -> cleanup.
The same module runs on a kind cluster (e2e/kind/run.sh); only the set-up differs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import zmq
from lmcache_operator.api.policy import DEFAULT_ALLOWED_HOST_PATH_PREFIXES

from e2e.k8s import plain_vllm, vllm_deployment
from e2e.k8s.conftest import REPO, Settings
from e2e.k8s.kube import Kube, Timings, http_get
from e2e.vllm.harness import (
    Completion,
    prompt_text,
    retrieved_tokens_logged,
    stream_completion,
    vllm_counter,
)
from tests.support import wait_until

pytestmark = pytest.mark.k8s

CLUSTER = "cache"
HTTP_PORT = 8080
CHUNK = 256  # the LMCacheCluster's server.chunkSize (default)
VERIFY = "vllm:lmcache_node_verify_chunks_total"  # verify mode's outcomes, on vLLM's /metrics
CHART = REPO / "charts" / "lmcache-operator"
HOST_IP = "status.hostIP"
# the connector's log line for a hit served by the node server
LOADED_LOG = re.compile(r"loaded (\d+) tokens from the node server")


def _helm_values(kube: Kube, settings: Settings, **extra: str) -> list[str]:
    if settings.no_cluster_dns:
        service = kube.get("service", "kubernetes", "default")
        assert service is not None
        extra = {
            "hostAliases[0].ip": service["spec"]["clusterIP"],
            "hostAliases[0].hostnames[0]": "kubernetes.default.svc",
            **extra,
        }
    if settings.vllm_model_dir is not None:  # the generated model's hostPath must be allowed
        prefixes = [*DEFAULT_ALLOWED_HOST_PATH_PREFIXES, os.path.dirname(settings.vllm_model_dir)]
        extra = {"allowedHostPathPrefixes": "{" + ",".join(prefixes) + "}", **extra}
    values = {
        "image.repository": f"{settings.registry}/lmcache-operator",
        "image.tag": settings.tag,
        "image.pullPolicy": "Never",
        # on the real node: kwok nodes would "run" the operator without running anything
        "nodeSelector.kubernetes\\.io/hostname": settings.node,
        **extra,
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _cache_cluster(settings: Settings) -> dict[str, Any]:
    return {
        "apiVersion": "lmcache.dev/v1alpha1",
        "kind": "LMCacheCluster",
        "metadata": {"name": CLUSTER, "namespace": settings.cache_namespace},
        "spec": {
            "device": "cpu",
            "image": {
                "repository": f"{settings.registry}/lmcache-node",
                "tag": f"{settings.tag}-cpu",  # the CPU variant images/build.sh tags
                "pullPolicy": "Never",
            },
            "cache": {"cpuSize": "512Mi"},
            "server": {"port": 5555, "httpPort": HTTP_PORT},
            # default placement: GPU nodes (the real node is labelled as one)
        },
    }


def _status(kube: Kube, settings: Settings) -> dict[str, Any]:
    body = kube.get("lmcacheclusters.lmcache.dev", CLUSTER, settings.cache_namespace)
    return dict((body or {}).get("status") or {})


def _condition(status: dict[str, Any], kind: str) -> str | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == kind:
            return str(condition.get("status"))
    return None


def _ready(kube: Kube, settings: Settings) -> dict[str, Any] | None:
    status = _status(kube, settings)
    if (
        status.get("phase") == "Ready"
        and _condition(status, "Ready") == "True"
        and status.get("readyNodes", 0) >= 1
        and status.get("readyNodes") == status.get("desiredNodes")
    ):
        return status
    return None


def _real_endpoint(status: dict[str, Any], node: str) -> dict[str, Any] | None:
    for endpoint in status.get("endpoints") or []:
        if endpoint.get("node") == node and endpoint.get("ready"):
            return dict(endpoint)
    return None


def _operator_pod(kube: Kube, settings: Settings) -> dict[str, Any] | None:
    """The operator pod that leads: the chart runs two replicas, the holder of the Lease
    lmcache-operator (identity <pod name>-<pid>) does the work."""
    pods = kube.items(
        "pods",
        settings.operator_namespace,
        f"app.kubernetes.io/instance={settings.release},app.kubernetes.io/name=lmcache-operator",
    )
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    lease = kube.get("lease", "lmcache-operator", settings.operator_namespace) or {}
    holder = str((lease.get("spec") or {}).get("holderIdentity") or "")
    leaders = [p for p in live if holder.startswith(f"{p['metadata']['name']}-")]
    return leaders[0] if len(leaders) == 1 else None


def _pod_ready(pod: dict[str, Any] | None) -> bool:
    conditions = ((pod or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def installed(kube: Kube, settings: Settings, timings: Timings) -> Iterator[None]:
    """helm install; at the end, everything removed whatever happened in between."""
    start = time.monotonic()
    kube.helm(
        "install",
        settings.release,
        str(CHART),
        "--namespace",
        settings.operator_namespace,
        "--create-namespace",
        *_helm_values(kube, settings),
        "--wait",
        "--timeout",
        "180s",
        timeout=240,
    )
    timings.record("helm install --wait (operator Ready)", time.monotonic() - start)
    kube.kubectl("create", "namespace", settings.cache_namespace)
    # cache pods mount the host's /dev/shm and use the host network
    kube.kubectl(
        "label",
        "namespace",
        settings.cache_namespace,
        "pod-security.kubernetes.io/enforce=privileged",
    )
    try:
        yield
    finally:
        kube.kubectl(
            "delete", "lmcacheclusters.lmcache.dev", "--all", "-n", settings.cache_namespace,
            "--ignore-not-found", "--wait=true", "--timeout=60s", check=False,
        )  # fmt: skip
        kube.kubectl("delete", "namespace", settings.cache_namespace, "--ignore-not-found",
                     "--wait=false", check=False)  # fmt: skip
        kube.helm("uninstall", settings.release, "-n", settings.operator_namespace,
                  "--ignore-not-found", check=False)  # fmt: skip


def test_operator_runs_with_the_charts_identity(
    kube: Kube, settings: Settings, installed: None
) -> None:
    pod = _operator_pod(kube, settings)
    assert pod is not None and _pod_ready(pod)
    spec = pod["spec"]
    assert spec["nodeName"] == settings.node
    assert spec["serviceAccountName"] == settings.service_account.split(":")[1]
    container = spec["containers"][0]
    assert container["image"] == settings.image("operator")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    statuses = pod["status"]["containerStatuses"]
    assert statuses[0]["restartCount"] == 0, "the operator restarted (liveness or crash)"
    crd = kube.get("crd", "lmcacheclusters.lmcache.dev")
    assert crd is not None
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_cache_cluster_becomes_ready_on_the_real_node(
    kube: Kube, settings: Settings, timings: Timings, installed: None
) -> None:
    start = time.monotonic()
    kube.apply(_cache_cluster(settings))
    status = wait_until(lambda: _ready(kube, settings), 180, "LMCacheCluster Ready", interval=0.5)
    timings.record("LMCacheCluster apply -> Ready", time.monotonic() - start)
    endpoint = _real_endpoint(status, settings.node)
    assert endpoint is not None, f"no ready endpoint on {settings.node}: {status.get('endpoints')}"
    assert status["observedGeneration"] >= 1
    # the children the operator applied, owned by the cluster
    for kind, name in [
        ("daemonset", f"{CLUSTER}-cache"),
        ("configmap", f"{CLUSTER}-cache-config"),
        ("configmap", f"{CLUSTER}-cache-keys"),
        ("secret", f"{CLUSTER}-cache-credentials"),
        ("secret", f"{CLUSTER}-client-credentials"),
        ("service", f"{CLUSTER}-cache"),
        ("service", f"{CLUSTER}-cache-metrics"),
    ]:
        child = kube.get(kind, name, settings.cache_namespace)
        assert child is not None, f"{kind}/{name} missing"
        owners = child["metadata"].get("ownerReferences") or []
        assert [o["kind"] for o in owners] == ["LMCacheCluster"], f"{kind}/{name}: {owners}"


def test_cache_pod_serves_on_the_nodes_ip(kube: Kube, settings: Settings, installed: None) -> None:
    status = _status(kube, settings)
    endpoint = _real_endpoint(status, settings.node)
    assert endpoint is not None
    pods = kube.items("pods", settings.cache_namespace, f"lmcache.dev/cluster={CLUSTER}")
    (pod,) = [p for p in pods if p["spec"]["nodeName"] == settings.node]
    assert pod["spec"]["hostNetwork"] is True
    assert pod["status"]["hostIP"] == endpoint["hostIP"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == settings.image("node")
    # the server runs as the cluster's own user and serves CURVE only, with the key pair the
    # operator made: the public key of server.key is the one in the status and client Secret
    assert pod["spec"]["securityContext"]["runAsUser"] != 65532
    log = kube.kubectl("logs", pod["metadata"]["name"], "-n", settings.cache_namespace).stdout
    credentials = status["credentials"]
    server_key = credentials["serverKey"]
    assert f"(CURVE, server key {server_key['fingerprint']}, 1 allowed client key(s)" in log, log
    secret = kube.get("secret", f"{CLUSTER}-cache-credentials", settings.cache_namespace)
    client = kube.get("secret", f"{CLUSTER}-client-credentials", settings.cache_namespace)
    assert secret is not None and client is not None
    server_secret = base64.b64decode(secret["data"]["server.key"]).strip()
    assert zmq.curve_public(server_secret).decode() == server_key["publicKey"]
    assert (
        base64.b64decode(client["data"]["server.pub"]).decode().strip() == server_key["publicKey"]
    )
    # the admin endpoints want the cluster's token (the HTTP API binds the node's IP and
    # loopback; a token configured, loopback is no exception)
    token = base64.b64decode(secret["data"]["http.token"]).decode().strip()
    with _cache_url(kube, settings) as url:
        assert _post(f"{url}/cache/clear") == 401
        assert _post(f"{url}/cache/clear", token) == 200
    # what vLLM pods use: the node's IP (status.hostIP) and the server's ports
    in_cluster = _probe_from_a_pod(kube, settings, endpoint["hostIP"])
    assert in_cluster["healthz"] == 200, in_cluster
    assert in_cluster["readyz"] == 200, in_cluster
    assert "lmcache_node_l1_capacity_bytes" in in_cluster["metrics"]
    if settings.host_reaches_node:
        code, body = http_get(f"http://{endpoint['hostIP']}:{HTTP_PORT}/healthz")
        assert code == 200, body
        code, metrics = http_get(f"http://{endpoint['hostIP']}:{HTTP_PORT}/metrics")
        assert code == 200
        capacity = [
            line for line in metrics.splitlines()
            if line.startswith("lmcache_node_l1_capacity_bytes ")
        ]  # fmt: skip
        assert capacity and float(capacity[0].split()[1]) == 512 * 2**20


def _post(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, method="POST")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


PROBE_SCRIPT = """
import json, os, urllib.request
base = "http://%s:%s" % (os.environ["HOST_IP"], os.environ["PORT"])
out = {}
for path in ("healthz", "readyz"):
    try:
        out[path] = urllib.request.urlopen(base + "/" + path, timeout=5).status
    except Exception as exc:
        out[path] = repr(exc)
out["metrics"] = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()[:20000]
print(json.dumps(out))
"""


def _probe_from_a_pod(kube: Kube, settings: Settings, host_ip: str) -> dict[str, Any]:
    """Run a pod on the real node (node image) that calls the cache at status.hostIP."""
    name = "cache-probe"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": settings.cache_namespace},
        "spec": {
            "restartPolicy": "Never",
            "nodeName": settings.node,
            "containers": [
                {
                    "name": "probe",
                    "image": settings.image("node"),
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", PROBE_SCRIPT],
                    "env": [
                        {
                            "name": "HOST_IP",
                            "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}},
                        },
                        {"name": "PORT", "value": str(HTTP_PORT)},
                    ],
                    "securityContext": {"allowPrivilegeEscalation": False},
                }
            ],
        },
    }
    kube.apply(pod)
    try:
        wait_until(
            lambda: (
                (kube.get("pod", name, settings.cache_namespace) or {})
                .get("status", {})
                .get("phase")
                in ("Succeeded", "Failed")
            ),
            120,
            "probe pod finished",
            interval=0.5,
        )
        phase = kube.get("pod", name, settings.cache_namespace)["status"]["phase"]  # type: ignore[index]
        logs = kube.kubectl("logs", name, "-n", settings.cache_namespace).stdout
        assert phase == "Succeeded", logs
        result: dict[str, Any] = json.loads(logs.strip().splitlines()[-1])
        assert host_ip  # the pod saw the same node IP through the downward API
        return result
    finally:
        kube.kubectl("delete", "pod", name, "-n", settings.cache_namespace, "--wait=false",
                     check=False)  # fmt: skip


@dataclass
class VLLM:
    """The VLLMDeployment's pod (when E2E_VLLM_MODEL_DIR is set) and what it answered cold."""

    url: str
    pod: str
    prompt: str
    cold_text: str | None = None


def _vllm_status(kube: Kube, settings: Settings) -> dict[str, Any]:
    body = kube.get("vllmdeployments.lmcache.dev", vllm_deployment.NAME, settings.cache_namespace)
    return dict((body or {}).get("status") or {})


def _vllm_pods(kube: Kube, settings: Settings) -> list[dict[str, Any]]:
    selector = f"lmcache.dev/vllm-deployment={vllm_deployment.NAME}"
    pods = kube.items("pods", settings.cache_namespace, selector)
    for pod in pods:
        for status in pod.get("status", {}).get("containerStatuses") or []:
            if status.get("restartCount", 0) > 0:
                last = (status.get("lastState") or {}).get("terminated") or {}
                hint = (
                    "; raise resources.memory in e2e/k8s/vllm_deployment.py"
                    if last.get("reason") == "OOMKilled"
                    else ""
                )
                # the container's last log lines (terminationMessagePolicy FallbackToLogsOnError)
                raise AssertionError(
                    f"vLLM restarted: {last.get('reason')} (exit {last.get('exitCode')}){hint}\n"
                    f"{str(last.get('message') or '')[-3000:]}"
                )
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _vllm_ready(kube: Kube, settings: Settings) -> dict[str, Any] | None:
    """The VLLMDeployment's status once it says Ready with its cache Ready and compatible."""
    _vllm_pods(kube, settings)  # fail fast on a crash loop
    status = _vllm_status(kube, settings)
    if (
        _condition(status, "Ready") == "True"
        and _condition(status, "CacheReady") == "True"
        and _condition(status, "CacheCompatible") == "True"
        and status.get("readyReplicas") == 1
    ):
        return status
    return None


@pytest.fixture(scope="module")
def vllm(
    kube: Kube, settings: Settings, timings: Timings, installed: None
) -> Iterator[VLLM | None]:
    """A VLLMDeployment on the real node wired by the operator to its cache server."""
    if settings.vllm_model_dir is None:
        yield None
        return
    start = time.monotonic()
    kube.apply(vllm_deployment.build(settings, settings.vllm_model_dir, CLUSTER))
    status = wait_until(
        lambda: _vllm_ready(kube, settings),
        600,
        "VLLMDeployment Ready (CacheReady, CacheCompatible)",
        interval=2,
    )
    timings.record("VLLMDeployment apply -> Ready", time.monotonic() - start)
    assert status["cache"]["clusterRef"] == CLUSTER
    assert status["observedGeneration"] >= 1
    (pod,) = _vllm_pods(kube, settings)
    # what the operator built: on the real node, beside a Ready cache pod, wired to it
    assert pod["spec"]["nodeName"] == settings.node
    assert not pod["spec"].get("schedulingGates"), "the scheduling gate was never lifted"
    container = pod["spec"]["containers"][0]
    assert container["image"] == settings.image("vllm-cpu")
    transfer = json.loads(container["args"][container["args"].index("--kv-transfer-config") + 1])
    assert transfer["kv_connector_extra_config"]["lmcache.node.host"] == "tcp://$(HOST_IP)"
    wait_until(
        lambda: vllm_deployment.NAME in (_status(kube, settings).get("consumers") or []),
        30,
        "the LMCacheCluster's status.consumers to list the VLLMDeployment",
        interval=0.5,
    )
    prompt = prompt_text(3, 4000)
    if settings.host_reaches_node:
        # through the Service (kube-proxy) the operator created, as clients in the cluster do
        service = kube.get("service", vllm_deployment.NAME, settings.cache_namespace)
        assert service is not None
        yield VLLM(
            f"http://{service['spec']['clusterIP']}:{vllm_deployment.PORT}",
            pod["metadata"]["name"],
            prompt,
        )
        return
    with kube.port_forward(
        settings.cache_namespace, f"svc/{vllm_deployment.NAME}", vllm_deployment.PORT
    ) as url:
        yield VLLM(url, pod["metadata"]["name"], prompt)


@contextmanager
def _cache_url(kube: Kube, settings: Settings) -> Iterator[str]:
    """The HTTP API of the cache server on the real node: its IP, or a port-forward."""
    endpoint = _real_endpoint(_status(kube, settings), settings.node)
    assert endpoint is not None, "no ready cache server on the real node"
    if settings.host_reaches_node:
        yield f"http://{endpoint['hostIP']}:{HTTP_PORT}"
        return
    target = f"pod/{endpoint['pod']}"
    with kube.port_forward(settings.cache_namespace, target, HTTP_PORT) as url:
        yield url


def _metric(kube: Kube, settings: Settings, name: str, labels: str) -> float:
    with _cache_url(kube, settings) as url:
        code, text = http_get(f"{url}/metrics")
    assert code == 200, text
    pattern = re.compile(rf"^{re.escape(name)}\{{{re.escape(labels)}\}}\s+(\S+)$", re.M)
    match = pattern.search(text)
    return float(match.group(1)) if match else 0.0


def _retrieved(kube: Kube, settings: Settings) -> float:
    return _metric(kube, settings, "lmcache_node_tokens_total", 'kind="retrieved"')


def _verified(vllm: VLLM) -> dict[str, float]:
    return {o: vllm_counter(vllm.url, VERIFY, outcome=o) for o in ("matched", "mismatched")}


def _complete(vllm: VLLM, prompt: str) -> Completion:
    return stream_completion(vllm.url, vllm_deployment.SERVED_MODEL, prompt)


def test_vllm_second_request_is_served_by_the_node_cache(
    kube: Kube, settings: Settings, timings: Timings, vllm: VLLM | None
) -> None:
    if vllm is None:
        pytest.skip("E2E_VLLM_MODEL_DIR not set: no vLLM pod in this run")
    before = _retrieved(kube, settings)
    verified_before = _verified(vllm)
    cold = _complete(vllm, vllm.prompt)
    warm = _complete(vllm, vllm.prompt)
    expected = (cold.prompt_tokens - 1) // CHUNK * CHUNK
    assert expected >= 2 * CHUNK, f"prompt too short: {cold.prompt_tokens} tokens"
    # verify mode: the KV bytes vLLM got back are the bytes it stored, chunk by chunk (vLLM
    # publishes the connector's counts with its stats, a moment after the request)
    wait_until(
        lambda: _verified(vllm)["matched"] - verified_before["matched"] >= expected // CHUNK,
        60,
        f"{expected // CHUNK} verified chunks",
    )
    verified = _verified(vllm)
    assert verified["mismatched"] == verified_before["mismatched"], verified
    assert warm.text == cold.text, "greedy output changed when the prefix came from the cache"
    retrieved = _retrieved(kube, settings) - before
    assert retrieved == expected, f"the node cache served {retrieved} tokens, not {expected}"
    log = kube.kubectl("logs", vllm.pod, "-n", settings.cache_namespace).stdout
    logged = [int(n) for n in LOADED_LOG.findall(log)] + retrieved_tokens_logged(log)
    assert expected in logged, f"the connector logged no load of {expected} tokens: {logged}"
    vllm.cold_text = cold.text
    timings.record("vLLM TTFT cold (prefix computed)", cold.ttft_s)
    timings.record("vLLM TTFT warm (prefix from the node cache)", warm.ttft_s)


def test_deleted_cache_pod_comes_back_and_status_follows(
    kube: Kube, settings: Settings, timings: Timings, vllm: VLLM | None
) -> None:
    pods = kube.items("pods", settings.cache_namespace, f"lmcache.dev/cluster={CLUSTER}")
    (old,) = [p for p in pods if p["spec"]["nodeName"] == settings.node]
    ns = settings.cache_namespace
    with contextlib.ExitStack() as watches:
        phases = watches.enter_context(
            kube.watch_values("lmcacheclusters.lmcache.dev", CLUSTER, ns, "{.status.phase}")
        )
        # the VLLMDeployment's CacheReady condition over time
        cache_ready: list[str] = []
        if vllm is not None:
            cache_ready = watches.enter_context(
                kube.watch_values("vllmdeployments.lmcache.dev", vllm_deployment.NAME, ns,
                                  '{.status.conditions[?(@.type=="CacheReady")].status}')
            )  # fmt: skip
        start = time.monotonic()
        kube.kubectl("delete", "pod", old["metadata"]["name"], "-n", ns, "--wait=false")
        if vllm is not None and vllm.cold_text is not None:
            # the cache is going away: vLLM recomputes and answers the same
            assert _complete(vllm, vllm.prompt).text == vllm.cold_text

        def back_ready() -> dict[str, Any] | None:
            status = _status(kube, settings)
            endpoint = _real_endpoint(status, settings.node)
            if (
                status.get("phase") == "Ready"
                and endpoint
                and endpoint["pod"] != old["metadata"]["name"]
            ):
                return status
            return None

        wait_until(back_ready, 180, "cache pod replaced and cluster Ready", interval=0.2)
        timings.record("cache pod deleted -> Ready again", time.monotonic() - start)
        if vllm is not None:
            wait_until(
                lambda: _condition(_vllm_status(kube, settings), "CacheReady") == "True",
                60,
                "VLLMDeployment CacheReady=True again",
                interval=0.5,
            )
        phases, cache_ready = list(phases), list(cache_ready)
    assert phases[0] == "Ready" and "Degraded" in phases, f"status never showed the loss: {phases}"
    assert phases[-1] == "Ready", phases
    if vllm is not None:
        # the VLLMDeployment said its replica had no Ready cache, then that it has one again
        assert "False" in cache_ready, f"CacheReady never went False: {cache_ready}"
        assert cache_ready[-1] == "True", cache_ready
        assert [p["metadata"]["name"] for p in _vllm_pods(kube, settings)] == [vllm.pod], (
            "the vLLM pod was replaced: losing the cache must not restart vLLM"
        )
    status = _status(kube, settings)
    endpoint = _real_endpoint(status, settings.node)
    assert endpoint is not None
    with _cache_url(kube, settings) as url:
        assert http_get(f"{url}/healthz")[0] == 200
    if vllm is not None and vllm.cold_text is not None:
        # the new cache server (it adopted the node's pool, or fills again) serves a later
        # identical request once the connector has reconnected (it retries in the
        # background): a bounded number of tries
        before = _retrieved(kube, settings)

        def hit_again() -> bool:
            assert _complete(vllm, vllm.prompt).text == vllm.cold_text
            return _retrieved(kube, settings) - before > 0

        start = time.monotonic()
        wait_until(hit_again, 120, "a hit on the new cache server", interval=2)
        timings.record("cache back -> vLLM hits again", time.monotonic() - start)


def _gauge(kube: Kube, settings: Settings, name: str) -> float:
    """A label-less metric of the cache server on the real node (0 when absent)."""
    with _cache_url(kube, settings) as url:
        code, text = http_get(f"{url}/metrics")
    assert code == 200, text
    match = re.search(rf"^{re.escape(name)}\s+(\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_config_change_rolls_the_cache_pod_and_the_prefix_stays_cached(
    kube: Kube, settings: Settings, timings: Timings, vllm: VLLM | None
) -> None:
    """The operator replaces the cache pod for a new config; the new server adopts the
    node's L1 pool, so the prompt cached before the roll is served from it after."""
    if vllm is None or vllm.cold_text is None:
        pytest.skip("no vLLM pod (or no cold answer) in this run")
    ns = settings.cache_namespace
    # the prefix is in the node cache now (a request stores it, or hits it)
    assert _complete(vllm, vllm.prompt).text == vllm.cold_text
    before = _status(kube, settings)
    old_pod = (_real_endpoint(before, settings.node) or {}).get("pod")
    assert old_pod, before.get("endpoints")
    old_revision = (before.get("rollout") or {}).get("revision")
    start = time.monotonic()
    # a config key the servers read at start: a new pod template, the same pool geometry
    kube.kubectl("patch", "lmcacheclusters.lmcache.dev", CLUSTER, "-n", ns, "--type=merge",
                 "-p", json.dumps({"spec": {"config": {"lock_ttl_secs": 25}}}))  # fmt: skip

    def rolled() -> tuple[dict[str, Any], dict[str, Any]] | None:
        status = _status(kube, settings)
        rollout = status.get("rollout") or {}
        entry = next(
            (n for n in rollout.get("nodes") or [] if n.get("node") == settings.node), None
        )
        endpoint = _real_endpoint(status, settings.node)
        if (
            rollout.get("revision") not in (None, old_revision)
            and entry is not None
            and entry.get("state") == "Updated"
            and endpoint is not None
            and endpoint["pod"] != old_pod
        ):
            return status, entry
        return None

    status, entry = wait_until(rolled, 300, "the cache pod on the real node rolled", interval=1)
    timings.record("config change -> cache pod rolled (real node)", time.monotonic() - start)
    assert entry["pool"] == "adopted", entry
    assert entry["adoptedEntries"] > 0 and entry["adoptedBytes"] > 0, entry
    endpoint = _real_endpoint(status, settings.node)
    assert endpoint is not None and endpoint["pool"]["state"] == "adopted", endpoint
    # vLLM kept running through the roll, and its connector re-registered with the new server
    assert [p["metadata"]["name"] for p in _vllm_pods(kube, settings)] == [vllm.pod]
    wait_until(
        lambda: _gauge(kube, settings, "lmcache_node_registered_workers") >= 1,
        120,
        "the vLLM connector re-registered with the new cache server",
        interval=1,
    )
    # the new server stored nothing yet: whatever it serves now came from the adopted pool
    assert _metric(kube, settings, "lmcache_node_tokens_total", 'kind="stored"') == 0
    retrieved_before = _retrieved(kube, settings)
    warm = _complete(vllm, vllm.prompt)
    assert warm.text == vllm.cold_text
    expected = (warm.prompt_tokens - 1) // CHUNK * CHUNK
    retrieved = _retrieved(kube, settings) - retrieved_before
    assert retrieved == expected, (
        f"after the roll the node cache served {retrieved} tokens of the prompt, not {expected}"
    )
    timings.record("vLLM TTFT after the roll (prefix from the adopted pool)", warm.ttft_s)


def test_a_plain_deployment_labelled_for_the_webhook_hits_its_nodes_cache(
    kube: Kube, settings: Settings, timings: Timings, installed: None
) -> None:
    """Any vLLM: the stock vLLM CPU image in a plain Deployment (no VLLMDeployment), labelled
    lmcache.dev/cluster, is wired by the operator's webhook and gets a hit on its second
    request through its node's cache server."""
    if settings.vllm_model_dir is None:
        pytest.skip("E2E_VLLM_MODEL_DIR not set: no vLLM pod in this run")
    ns = settings.cache_namespace
    connection = kube.get("configmap", f"{CLUSTER}-connection", ns)
    assert connection is not None, "the LMCacheCluster has no connection ConfigMap"
    assert _status(kube, settings)["connection"]["configMap"] == f"{CLUSTER}-connection"
    if kube.get("vllmdeployments.lmcache.dev", vllm_deployment.NAME, ns) is not None:
        # one vLLM at a time on this node: the VLLMDeployment makes room (scale subresource)
        kube.kubectl("scale", "vllmdeployments.lmcache.dev", vllm_deployment.NAME,
                     "--replicas=0", "-n", ns)  # fmt: skip
        wait_until(lambda: not _vllm_pods(kube, settings), 180, "the VLLMDeployment's pod gone")
    start = time.monotonic()
    for obj in plain_vllm.build(settings, settings.vllm_model_dir, CLUSTER):
        kube.apply(obj)
    try:
        pod = wait_until(
            lambda: plain_vllm.ready_pod(kube, settings),
            600,
            "the plain vLLM pod Ready",
            interval=2,
        )
        timings.record("plain Deployment (webhook) apply -> Ready", time.monotonic() - start)
        annotations = pod["metadata"].get("annotations") or {}
        assert annotations.get("lmcache.dev/injection") == "injected", annotations
        assert pod["spec"]["nodeName"] == settings.node
        container = pod["spec"]["containers"][0]
        args = container["args"]
        kv = json.loads(args[args.index("--kv-transfer-config") + 1])
        assert kv["kv_connector"] == "LMCacheNodeConnector"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["LMCACHE_NODE_HOST"] == "tcp://$(HOST_IP)"
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["lmcache-client-credentials"]["secret"]["secretName"] == (
            f"{CLUSTER}-client-credentials"
        )
        prompt = prompt_text(11, 4000)  # "[11] ...": no chunk in common with other prompts

        def complete(url: str) -> tuple[Completion, Completion, float, float]:
            before = _retrieved(kube, settings)
            cold = stream_completion(url, plain_vllm.SERVED_MODEL, prompt)
            after_cold = _retrieved(kube, settings)
            warm = stream_completion(url, plain_vllm.SERVED_MODEL, prompt)
            return cold, warm, after_cold - before, _retrieved(kube, settings) - after_cold

        if settings.host_reaches_node:
            service = kube.get("service", plain_vllm.NAME, ns)
            assert service is not None
            url = f"http://{service['spec']['clusterIP']}:{plain_vllm.PORT}"
            cold, warm, cold_hits, warm_hits = complete(url)
        else:
            with kube.port_forward(ns, f"svc/{plain_vllm.NAME}", plain_vllm.PORT) as url:
                cold, warm, cold_hits, warm_hits = complete(url)
        expected = (cold.prompt_tokens - 1) // CHUNK * CHUNK
        assert expected >= 2 * CHUNK, f"prompt too short: {cold.prompt_tokens} tokens"
        assert cold_hits == 0, f"the first request was served {cold_hits} tokens from the cache"
        assert warm.text == cold.text, "greedy output changed when the prefix came from the cache"
        assert warm_hits == expected, f"the node cache served {warm_hits} tokens, not {expected}"
        log = kube.kubectl("logs", pod["metadata"]["name"], "-n", ns).stdout
        logged = [int(n) for n in LOADED_LOG.findall(log)] + retrieved_tokens_logged(log)
        assert expected in logged, f"the connector logged no load of {expected} tokens: {logged}"
        timings.record("plain vLLM TTFT cold", cold.ttft_s)
        timings.record("plain vLLM TTFT warm (prefix from the node cache)", warm.ttft_s)
    finally:
        kube.kubectl("delete", "deployment,service", plain_vllm.NAME, "-n", ns,
                     "--ignore-not-found", "--wait=false", check=False)  # fmt: skip
        wait_until(
            lambda: not kube.items("pods", ns, f"app={plain_vllm.NAME}"),
            120,
            "the plain vLLM pod gone",
        )


# What the operator must be allowed (it did all of the above with exactly this, and it
# writes the per-cluster credential Secrets) ...
NEEDED = [
    ("watch", "lmcacheclusters.lmcache.dev", "-A"),
    ("get", "lmcacheclusters.lmcache.dev", "-A"),
    ("patch", "lmcacheclusters.lmcache.dev/status", "-A"),
    ("create", "daemonsets.apps", "-A"),
    ("patch", "daemonsets.apps", "-A"),
    ("create", "configmaps", "-A"),
    ("patch", "configmaps", "-A"),
    ("patch", "services", "-A"),
    ("watch", "pods", "-A"),
    ("create", "events", "-A"),
    ("watch", "vllmdeployments.lmcache.dev", "-A"),
    ("patch", "deployments.apps", "-A"),
    ("patch", "vllmdeployments.lmcache.dev/status", "-A"),
    ("patch", "pods", "-A"),
    ("delete", "pods", "-A"),
    ("list", "customresourcedefinitions.apiextensions.k8s.io"),
    ("watch", "nodes"),
    ("create", "secrets", "-A"),
    ("patch", "secrets", "-A"),
    ("delete", "secrets", "-A"),
    ("watch", "configmaps", "-A"),  # repair of children deleted or edited by hand
    ("watch", "services", "-A"),
    ("patch", "pods/status", "-A"),  # the CacheGate condition of a pod gated too long
    ("get", "configmaps", "-A"),  # spec.configFrom; the webhook reads <cluster>-connection
    ("get", "namespaces"),  # the webhook reads a namespace's lmcache.dev/cluster label
    ("create", "persistentvolumeclaims", "-A"),  # VLLMDeployment model.cache.size
    ("patch", "persistentvolumeclaims", "-A"),
    ("delete", "daemonsets.apps", "-A"),  # a deleted cluster's servers stop before cleanup
    ("create", "jobs.batch", "-A"),  # the pool cleanup Job per node
    ("list", "jobs.batch", "-A"),
    ("delete", "deployments.apps", "-A"),  # a router switched off
    ("delete", "services", "-A"),
    ("create", "serviceaccounts", "-A"),  # the router's ServiceAccount, Role, RoleBinding
    ("create", "roles.rbac.authorization.k8s.io", "-A"),
    ("create", "rolebindings.rbac.authorization.k8s.io", "-A"),
    ("list", "endpointslices.discovery.k8s.io", "-A"),  # what the router's Role grants
]
# ... and what it must not be: read Secrets, exec into pods, modify nodes, and more.
FORBIDDEN = [
    ("get", "secrets", "-A"),
    ("list", "secrets", "-A"),
    ("watch", "secrets", "-A"),
    ("update", "secrets", "-A"),
    ("get", "nodes"),
    ("get", "lmcacheclusters.lmcache.dev/status", "-A"),
    ("update", "lmcacheclusters.lmcache.dev", "-A"),
    ("delete", "lmcacheclusters.lmcache.dev", "-A"),
    ("delete", "configmaps", "-A"),
    ("create", "pods/exec", "-A"),
    ("create", "pods", "-A"),
    ("patch", "nodes"),
    ("delete", "nodes"),
    ("delete", "jobs.batch", "-A"),
    ("update", "pods", "-A"),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("create", "clusterroles.rbac.authorization.k8s.io"),
    ("escalate", "roles.rbac.authorization.k8s.io", "-A"),
    ("bind", "roles.rbac.authorization.k8s.io", "-A"),
    ("impersonate", "serviceaccounts", "-A"),
    ("list", "namespaces"),
    ("patch", "namespaces"),
    ("delete", "persistentvolumeclaims", "-A"),
    ("patch", "mutatingwebhookconfigurations.admissionregistration.k8s.io"),
    ("create", "serviceaccounts/token", "-A"),
]


def test_rbac_is_sufficient_and_minimal(kube: Kube, settings: Settings, installed: None) -> None:
    # sufficient: the cluster above became Ready through the operator alone; its log has
    # no permission errors
    pod = _operator_pod(kube, settings)
    assert pod is not None
    log = kube.kubectl("logs", pod["metadata"]["name"], "-n", settings.operator_namespace).stdout
    assert "403" not in log and "forbidden" not in log.lower(), log[-3000:]
    sa = settings.service_account
    lease = ("update", "leases.coordination.k8s.io", "-n", settings.operator_namespace)
    missing = [c for c in [*NEEDED, lease] if not kube.can_i(sa, *c)]
    assert not missing, f"the chart's RBAC lacks {missing}"
    granted = [c for c in FORBIDDEN if kube.can_i(sa, *c)]
    assert not granted, f"the chart's RBAC grants more than needed: {granted}"


def test_helm_upgrade_rolls_the_operator_and_leaves_the_caches_alone(
    kube: Kube, settings: Settings, timings: Timings, installed: None
) -> None:
    before = _operator_pod(kube, settings)
    assert before is not None
    daemonset = kube.get("daemonset", f"{CLUSTER}-cache", settings.cache_namespace)
    assert daemonset is not None
    cache_pods = {
        p["metadata"]["uid"]
        for p in kube.items("pods", settings.cache_namespace, f"lmcache.dev/cluster={CLUSTER}")
    }
    start = time.monotonic()
    kube.helm(
        "upgrade",
        settings.release,
        str(CHART),
        "--namespace",
        settings.operator_namespace,
        *_helm_values(kube, settings, **{"operator.logLevel": "DEBUG"}),
        "--wait",
        "--timeout",
        "180s",
        timeout=240,
    )
    timings.record("helm upgrade --wait", time.monotonic() - start)
    after = wait_until(
        lambda: (
            (p := _operator_pod(kube, settings))
            and p["metadata"]["uid"] != before["metadata"]["uid"]
            and _pod_ready(p)
            and p
        ),
        120,
        "the new operator pod Ready",
        interval=0.5,
    )
    assert "--log-level=DEBUG" in after["spec"]["containers"][0]["args"]
    # the new operator resumed the cluster without touching its pods
    ready = wait_until(lambda: _ready(kube, settings), 60, "cluster still Ready", interval=0.5)
    assert _real_endpoint(ready, settings.node) is not None
    now = kube.get("daemonset", f"{CLUSTER}-cache", settings.cache_namespace)
    assert now is not None
    assert now["metadata"]["generation"] == daemonset["metadata"]["generation"]
    assert {
        p["metadata"]["uid"]
        for p in kube.items("pods", settings.cache_namespace, f"lmcache.dev/cluster={CLUSTER}")
    } == cache_pods


def test_uninstall_and_deleting_the_resources_leaves_nothing(
    kube: Kube, settings: Settings, timings: Timings, installed: None
) -> None:
    start = time.monotonic()
    # the VLLMDeployment first (while the operator runs), then the cache it used
    kube.kubectl(
        "delete", "vllmdeployments.lmcache.dev", "--all", "-n", settings.cache_namespace,
        "--wait=true", "--timeout=60s",
    )  # fmt: skip
    kube.kubectl(
        "delete", "lmcacheclusters.lmcache.dev", CLUSTER, "-n", settings.cache_namespace,
        "--wait=true", "--timeout=240s",  # its finalizer: the pool cleanup Job per node
    )  # fmt: skip
    removed = [
        e for e in kube.items("events", settings.cache_namespace)
        if e.get("reason") in ("PoolsRemoved", "PoolCleanupIncomplete")
        and (e.get("involvedObject") or {}).get("name") == CLUSTER
    ]  # fmt: skip
    assert [e["reason"] for e in removed] == ["PoolsRemoved"], [e.get("message") for e in removed]
    selectors = [
        f"lmcache.dev/cluster={CLUSTER}",
        f"lmcache.dev/vllm-deployment={vllm_deployment.NAME}",
    ]

    def children_gone() -> list[str] | None:
        left = [
            f"{kind}/{o['metadata']['name']}"
            for kind in ("daemonsets", "deployments", "configmaps", "services")
            for selector in selectors
            for o in kube.items(kind, settings.cache_namespace, selector)
        ]
        return None if left else ["gone"]

    wait_until(children_gone, 60, "the resources' children garbage-collected", interval=0.5)
    wait_until(
        lambda: not any(kube.items("pods", settings.cache_namespace, s) for s in selectors),
        120,
        "cache and vLLM pods gone",
        interval=0.5,
    )
    kube.helm("uninstall", settings.release, "-n", settings.operator_namespace, "--wait")

    def leftovers() -> list[str]:
        found: list[str] = []
        for kind in ("deployments", "pods", "serviceaccounts", "roles", "rolebindings",
                     "configmaps", "services", "secrets"):  # fmt: skip
            found += [
                f"{kind}/{o['metadata']['name']}"
                for o in kube.items(kind, settings.operator_namespace)
                if o["metadata"]["name"] != "kube-root-ca.crt"
                and not o["metadata"]["name"].startswith("default")
            ]
        for kind in ("clusterroles", "clusterrolebindings", "mutatingwebhookconfigurations"):
            found += [
                f"{kind}/{o['metadata']['name']}"
                for o in kube.items(kind, selector=f"app.kubernetes.io/instance={settings.release}")
            ]
        return found

    # the operator pod takes its grace period to stop after helm returns
    left: list[str] = []

    def nothing_left() -> bool:
        left[:] = leftovers()
        return not left

    try:
        wait_until(nothing_left, 90, "everything of the release gone", interval=0.5)
    except AssertionError:
        raise AssertionError(f"left behind: {left}") from None
    timings.record("delete cluster + helm uninstall -> nothing left", time.monotonic() - start)
    # the CRD stays by design (helm.sh/resource-policy: keep); it holds no resources now
    assert kube.get("crd", "lmcacheclusters.lmcache.dev") is not None
    assert not kube.items("lmcacheclusters.lmcache.dev")
    assert not kube.items("vllmdeployments.lmcache.dev")
