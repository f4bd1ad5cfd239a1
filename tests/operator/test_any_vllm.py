"""Any vLLM on a real API server (kwok nodes): the connection ConfigMap, the injection webhook
(served by the operator on this host, registered with a url), the pod template patch, a
cluster's configFrom, and the model cache PVC."""

from __future__ import annotations

import base64
import itertools
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lmcache_node.server.process import free_port

from tests.operator.conftest import OperatorProcess
from tests.operator.kubectl import Cluster
from tests.support import wait_until

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lmcache-operator"
_PORTS = itertools.count(23000, 2)  # hostNetwork ports of each test's cache (kwok counts them)
CLUSTER = """
apiVersion: lmcache.dev/v1alpha1
kind: LMCacheCluster
metadata: {{name: {name}}}
spec:
  image: {{repository: lmcache.local/node, tag: dev, pullPolicy: Never}}
  server: {{port: {port}, httpPort: {http}}}
"""


def cluster_manifest(name: str = "cache", extra: str = "") -> str:
    port = next(_PORTS)
    return CLUSTER.format(name=name, port=port, http=port + 1) + extra


def events(k8s: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    out = k8s.kubectl(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json"
    ).stdout
    return list(json.loads(out)["items"])


def event_with(k8s: Cluster, ns: str, name: str, reason: str) -> dict[str, Any] | None:
    return next((e for e in events(k8s, ns, name) if e["reason"] == reason), None)


def status(k8s: Cluster, ns: str, name: str = "cache") -> dict[str, Any]:
    return (k8s.get("lmcc", name, ns) or {}).get("status") or {}


def config_valid(k8s: Cluster, ns: str, name: str = "cache") -> dict[str, Any]:
    conditions = status(k8s, ns, name).get("conditions") or []
    return next((c for c in conditions if c["type"] == "ConfigValid"), {})


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 (the API server dials the operator here)."""
    directory = tmp_path / "webhook"
    directory.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.crt"),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return directory


@pytest.fixture
def webhook_operator(
    k8s_cluster: Cluster,
    namespace: str,
    tmp_path: Path,
    certificate: Path,
    request: pytest.FixtureRequest,
) -> Iterator[tuple[OperatorProcess, int]]:
    port = free_port()
    process = OperatorProcess(
        k8s_cluster, namespace, tmp_path,
        extra_args=("--webhook-port", str(port), "--webhook-cert-dir", str(certificate),
                    "--webhook-address", "127.0.0.1", "--config-check-interval", "1"),
    )  # fmt: skip
    process.start()

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, 30, "the webhook server", interval=0.2)
        yield process, port
    finally:
        process.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"--- operator log ---\n{process.logs()}")


def chart_webhooks(k8s: Cluster, namespace: str, url: str, ca: bytes) -> dict[str, Any]:
    """The chart's MutatingWebhookConfiguration, pointed at ``url`` and limited to the test's
    namespace (other tests of the session must not be wired)."""
    rendered = subprocess.run(
        [str(k8s.bin_dir / "helm"), "template", "t", str(CHART), "-n", "lmcache-system",
         "--show-only", "templates/webhook.yaml"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    (config,) = [
        d for d in yaml.safe_load_all(rendered) if d["kind"] == "MutatingWebhookConfiguration"
    ]
    config["metadata"] = {"name": f"lmcache-test-{namespace}"}
    for hook in config["webhooks"]:
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {"url": f"{url}{path}", "caBundle": base64.b64encode(ca).decode()}
        for expression in hook["namespaceSelector"]["matchExpressions"]:
            if expression["key"] == "kubernetes.io/metadata.name":
                expression.update(operator="In", values=[namespace])
    return dict(config)


@pytest.fixture
def registered(
    k8s_cluster: Cluster, namespace: str, webhook_operator: tuple[OperatorProcess, int],
    certificate: Path,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    _, port = webhook_operator
    ca = (certificate / "tls.crt").read_bytes()
    config = chart_webhooks(k8s_cluster, namespace, f"https://127.0.0.1:{port}", ca)
    k8s_cluster.kubectl("apply", "-f", "-", stdin=json.dumps(config))
    try:
        yield config
    finally:
        k8s_cluster.kubectl(
            "delete", "mutatingwebhookconfiguration", config["metadata"]["name"], check=False
        )


def vllm_deployment(name: str, cluster: str, **container: Any) -> str:
    main = {"name": "vllm", "image": "vllm/vllm-openai:v0.32.0", **container}
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name, "lmcache.dev/cluster": cluster}},
                    "spec": {"containers": [main]},
                },
            },
        }
    )


def pod_of(k8s: Cluster, ns: str, app: str) -> dict[str, Any]:
    def created() -> dict[str, Any] | None:
        pods = k8s.items("pods", ns, f"app={app}")
        return pods[0] if pods else None

    return wait_until(created, 60, f"a pod of {app}")


def bare_pod(name: str, labels: dict[str, str]) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "containers": [
                    {
                        "name": "vllm",
                        "image": "vllm/vllm-openai:v0.32.0",
                        "command": ["vllm", "serve"],
                        "args": ["org/m"],
                    }
                ]
            },
        }
    )


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def connection_ready(k8s: Cluster, ns: str, name: str = "cache") -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        configmap = k8s.get("configmap", f"{name}-connection", ns)
        connected = status(k8s, ns, name).get("connection")
        return configmap if configmap and connected else None

    return wait_until(ready, 60, f"{name}-connection and status.connection")


def test_the_webhook_wires_labelled_pods_and_reports_the_rest(
    k8s_cluster: Cluster, namespace: str, registered: dict[str, Any]
) -> None:
    k8s, ns = k8s_cluster, namespace
    manifest = cluster_manifest()
    port = yaml.safe_load(manifest)["spec"]["server"]["port"]
    k8s.apply(manifest, ns)
    configmap = connection_ready(k8s, ns)
    assert status(k8s, ns)["connection"] == {
        "configMap": "cache-connection",
        "podLabel": "lmcache.dev/cluster=cache",
    }
    assert configmap["metadata"]["ownerReferences"][0]["kind"] == "LMCacheCluster"
    # a plain Deployment running vllm serve, labelled: fully wired
    k8s.apply(vllm_deployment("llm", "cache", command=["vllm", "serve"], args=["org/m"]), ns)
    pod = pod_of(k8s, ns, "llm")
    annotations = pod["metadata"]["annotations"]
    assert annotations["lmcache.dev/injection"] == "injected", annotations
    args = pod["spec"]["containers"][0]["args"]
    assert args[:1] == ["org/m"] and args[1] == "--kv-transfer-config"
    assert json.loads(args[2])["kv_connector"] == "LMCacheNodeConnector"
    env = env_of(pod)
    assert env["LMCACHE_NODE_PORT"] == str(port)
    assert env["LMCACHE_NODE_HOST"] == "tcp://$(HOST_IP)"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["lmcache-client-credentials"]["secret"]["secretName"] == (
        "cache-client-credentials"
    )
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert not event_with(k8s, ns, pod["metadata"]["name"], "LMCacheInjectionFailed")

    # a pod naming no cluster of this namespace: created all the same, and reported
    k8s.apply(bare_pod("lost", {"lmcache.dev/cluster": "nope"}), ns)
    lost = k8s.get("pod", "lost", ns)
    assert lost is not None
    assert lost["metadata"]["annotations"]["lmcache.dev/injection"] == "failed"
    assert (
        "no LMCacheCluster 'nope'"
        in lost["metadata"]["annotations"]["lmcache.dev/injection-message"]
    )
    event = wait_until(
        lambda: event_with(k8s, ns, "lost", "LMCacheInjectionFailed"),
        30,
        "the LMCacheInjectionFailed Event",
    )
    assert event["type"] == "Warning" and "nope" in event["message"]
    wait_until(
        lambda: (
            "lmcache.dev/injection-reported"
            in ((k8s.get("pod", "lost", ns) or {}).get("metadata", {}).get("annotations") or {})
        ),
        30,
        "the pod marked as reported",
    )

    # the namespace opts in: an unlabelled pod is wired, and labelled for the reporter
    k8s.kubectl("label", "namespace", ns, "lmcache.dev/cluster=cache")
    k8s.apply(bare_pod("plain", {}), ns)
    plain = k8s.get("pod", "plain", ns)
    assert plain is not None
    assert plain["metadata"]["labels"]["lmcache.dev/cluster"] == "cache"
    assert plain["metadata"]["annotations"]["lmcache.dev/injection"] == "injected"
    k8s.apply(bare_pod("optout", {"lmcache.dev/inject": "false"}), ns)
    optout = k8s.get("pod", "optout", ns)
    assert optout is not None and "env" not in optout["spec"]["containers"][0]


def test_a_webhook_that_is_down_never_blocks_a_pod_and_is_reported(
    k8s_cluster: Cluster,
    namespace: str,
    webhook_operator: tuple[OperatorProcess, int],
    certificate: Path,
) -> None:
    k8s, ns = k8s_cluster, namespace
    k8s.apply(cluster_manifest(), ns)
    connection_ready(k8s, ns)
    down = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    config = chart_webhooks(k8s, ns, down, (certificate / "tls.crt").read_bytes())
    k8s.kubectl("apply", "-f", "-", stdin=json.dumps(config))
    try:
        k8s.apply(bare_pod("unwired", {"lmcache.dev/cluster": "cache"}), ns)  # not refused
    finally:
        k8s.kubectl("delete", "mutatingwebhookconfiguration", config["metadata"]["name"])
    pod = k8s.get("pod", "unwired", ns)
    assert pod is not None and "lmcache.dev/injection" not in (
        pod["metadata"].get("annotations") or {}
    )
    event = wait_until(
        lambda: event_with(k8s, ns, "unwired", "LMCacheNotInjected"),
        30,
        "the LMCacheNotInjected Event",
    )
    assert "did not see it" in event["message"]


def test_the_connection_configmap_is_kept_and_its_patch_wires_a_deployment(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    k8s, ns = k8s_cluster, namespace
    manifest = cluster_manifest()
    k8s.apply(manifest, ns)
    online = connection_ready(k8s, ns)
    # offline (no cluster) and online are the same contract
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest)
    cli = [sys.executable, "-m", "lmcache_operator.cli", "connection", "-f", str(path), "-n", ns]
    offline = yaml.safe_load(subprocess.run(cli, capture_output=True, text=True,
                                            check=True).stdout)  # fmt: skip
    assert offline["data"] == online["data"]
    # deleted by hand: the operator puts it back
    uid = online["metadata"]["uid"]
    k8s.kubectl("delete", "configmap", "cache-connection", "-n", ns)
    wait_until(
        lambda: (
            (k8s.get("configmap", "cache-connection", ns) or {}).get("metadata", {}).get("uid")
            not in (None, uid)
        ),
        60,
        "cache-connection re-created",
    )
    # the patch, applied by kubectl (strategic merge) to a Deployment with its own /dev/shm
    k8s.apply(
        vllm_deployment(
            "patched", "other", command=["vllm", "serve"],
            volumeMounts=[{"name": "dshm", "mountPath": "/dev/shm"}],
        ).replace('"containers"', '"volumes": [{"name": "dshm", "emptyDir": {"medium": '
                                  '"Memory"}}], "containers"'),
        ns,
    )  # fmt: skip
    patch = subprocess.run([*cli, "-o", "patch"], capture_output=True, text=True,
                           check=True).stdout  # fmt: skip
    patch_file = tmp_path / "patch.yaml"
    patch_file.write_text(patch)
    k8s.kubectl("patch", "deployment", "patched", "-n", ns, "--patch-file", str(patch_file))
    template = (k8s.get("deployment", "patched", ns) or {})["spec"]["template"]
    assert template["metadata"]["labels"]["lmcache.dev/cluster"] == "cache"
    container = template["spec"]["containers"][0]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"] == "lmcache-shm"  # merged by mountPath: the host's shm
    assert {e["name"] for e in container["env"]} >= {"HOST_IP", "LMCACHE_NODE_PORT"}
    assert container["command"] == ["vllm", "serve"]
    assert [c["name"] for c in template["spec"]["initContainers"]] == ["install-connector"]


def test_config_from_a_configmap_is_checked_applied_and_followed(
    k8s_cluster: Cluster, namespace: str, webhook_operator: tuple[OperatorProcess, int]
) -> None:
    k8s, ns = k8s_cluster, namespace
    k8s.apply(cluster_manifest(extra="  configFrom: {name: lmcache-config}\n"), ns)
    missing = wait_until(
        lambda: (c := config_valid(k8s, ns)).get("status") == "False" and c,
        60,
        "ConfigValid=False for the missing ConfigMap",
    )
    assert "ConfigMap 'lmcache-config', key 'lmcache.yaml' does not exist" in missing["message"]
    assert k8s.get("daemonset", "cache-cache", ns) is None
    # created: noticed without a change of the LMCacheCluster (the periodic check)
    k8s.kubectl(
        "create", "configmap", "lmcache-config", "-n", ns,
        "--from-literal=lmcache.yaml=lock_ttl_secs: 20\nuse_layerwise: true\n",
    )  # fmt: skip
    wait_until(lambda: config_valid(k8s, ns).get("status") == "True", 60, "ConfigValid=True")
    node_config = yaml.safe_load(
        (k8s.get("configmap", "cache-cache-config", ns) or {})["data"]["config.yaml"]
    )
    assert node_config["lock_ttl_secs"] == 20 and node_config["use_layerwise"] is True
    event = wait_until(
        lambda: event_with(k8s, ns, "cache", "ConfigWarnings"), 30, "the ConfigWarnings Event"
    )
    assert "use_layerwise" in event["message"]
    before = wait_until(lambda: k8s.get("daemonset", "cache-cache", ns), 60, "the DaemonSet")
    hash_key = "lmcache.dev/config-hash"
    old = before["spec"]["template"]["metadata"]["annotations"][hash_key]
    changed = k8s.kubectl(
        "create", "configmap", "lmcache-config", "-n", ns, "--dry-run=client", "-o", "json",
        "--from-literal=lmcache.yaml=lock_ttl_secs: 25\n",
    ).stdout  # fmt: skip
    k8s.kubectl("apply", "-f", "-", stdin=changed)
    wait_until(
        lambda: (
            (k8s.get("daemonset", "cache-cache", ns) or {})["spec"]["template"]["metadata"][
                "annotations"
            ][hash_key]
            != old
        ),
        60,
        "the cache pods rolled by the changed ConfigMap",
    )
    bad = changed.replace("lock_ttl_secs: 25", "chunk_sizes: 1")
    k8s.kubectl("apply", "-f", "-", stdin=bad)
    refused = wait_until(
        lambda: (c := config_valid(k8s, ns)).get("status") == "False" and c,
        60,
        "ConfigValid=False for the unknown key",
    )
    assert "did you mean 'chunk_size'" in refused["message"]


VLLMD = """
apiVersion: lmcache.dev/v1alpha1
kind: VLLMDeployment
metadata: {{name: llm}}
spec:
  model: {{name: org/model, cache: {cache}}}
  cache: {{enabled: false}}
"""


def test_the_model_cache_pvc_belongs_to_the_deployment(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    k8s, ns = k8s_cluster, namespace
    refused = k8s.apply(VLLMD.format(cache="{claimName: a, size: 1Gi}"), ns, check=False)
    assert refused.returncode != 0 and "exactly one of claimName" in refused.stderr
    k8s.apply(VLLMD.format(cache="{size: 5Gi, storageClassName: standard}"), ns)
    pvc = wait_until(lambda: k8s.get("pvc", "llm-model-cache", ns), 60, "the model cache PVC")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert pvc["spec"]["storageClassName"] == "standard"
    assert pvc["metadata"]["ownerReferences"][0]["kind"] == "VLLMDeployment"
    deployment = wait_until(lambda: k8s.get("deployment", "llm", ns), 60, "the Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "llm-model-cache"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["HF_HOME"] == "/var/cache/huggingface"
