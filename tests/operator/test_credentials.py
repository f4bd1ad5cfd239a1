"""Per-cluster credentials on a real API server: created once, never read, repaired, rotated."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.operator.conftest import OperatorProcess
from tests.operator.kubectl import Cluster, ConfigMapRecorder, StatusRecorder
from tests.operator.test_cluster import manifest, wait_ready
from tests.operator.test_vllm_cluster import (
    cache_manifest,
    vllm_manifest,
    wait_cache_ready,
    wait_vllm,
)
from tests.support import wait_until

pytestmark = pytest.mark.k8s

CACHE_SECRET, CLIENT_SECRET, KEYS = (
    "cache-cache-credentials",
    "cache-client-credentials",
    "cache-cache-keys",
)


def obj(k8s: Cluster, kind: str, name: str, ns: str) -> dict[str, Any]:
    found = k8s.get(kind, name, ns)
    assert found is not None, f"{kind}/{name} missing"
    return found


def secret_data(k8s: Cluster, ns: str, name: str) -> dict[str, str]:
    """A Secret's decoded data (the test reads it as admin; the operator never may)."""
    obj = k8s.get("secret", name, ns)
    assert obj is not None, f"Secret {name} missing"
    return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}


def public_of(secret_key: str) -> str:
    return bytes(zmq.curve_public(secret_key.strip().encode())).decode()


def allowed_keys(k8s: Cluster, ns: str) -> list[str]:
    cm = k8s.get("configmap", KEYS, ns)
    assert cm is not None
    return keys_of(cm["data"]["clients.pub"])


def keys_of(clients_pub: str) -> list[str]:
    return [line.split()[0] for line in clients_pub.splitlines() if line.strip()]


def credentials(k8s: Cluster, ns: str, name: str = "cache") -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        st = (k8s.get("lmcc", name, ns) or {}).get("status") or {}
        return st.get("credentials")

    return wait_until(probe, 30, "status.credentials")


def repaired_secrets(operator: OperatorProcess) -> float:
    match = re.search(
        r'^lmcache_operator_children_repaired_total{kind="Secret"} (\S+)$',
        operator.metrics(),
        re.MULTILINE,
    )
    return float(match.group(1)) if match else 0.0


def check_pair(k8s: Cluster, ns: str) -> tuple[str, str]:
    """The two Secrets and the keys ConfigMap fit together: (server public, client public)."""
    cache = secret_data(k8s, ns, CACHE_SECRET)
    client = secret_data(k8s, ns, CLIENT_SECRET)
    assert sorted(cache) == ["http.token", "remote.key", "server.key"]
    assert sorted(client) == ["client.key", "client.pub", "server.pub"]
    server_public = public_of(cache["server.key"])
    assert client["server.pub"].strip() == server_public
    client_public = client["client.pub"].strip()
    assert public_of(client["client.key"]) == client_public
    assert client_public in allowed_keys(k8s, ns)
    keys = k8s.get("configmap", KEYS, ns)
    assert keys is not None and keys["data"]["server.pub"].strip() == server_public
    return server_public, client_public


@pytest.fixture
def fast_operator(
    k8s_cluster: Cluster, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    """Secrets checked every second, rotated keys rolled out after 3 s (instead of 90)."""
    process = OperatorProcess(
        k8s_cluster, namespace, tmp_path,
        extra_args=("--secret-check-interval", "1", "--key-propagation-delay", "3"),
    )  # fmt: skip
    process.start()
    try:
        yield process
    finally:
        process.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"--- operator log ---\n{process.logs()}")


def test_credentials_are_created_once_fit_together_and_are_never_read(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    k8s_cluster.apply(manifest(), namespace)
    wait_ready(k8s_cluster, namespace)
    server_public, client_public = check_pair(k8s_cluster, namespace)
    cache = secret_data(k8s_cluster, namespace, CACHE_SECRET)
    assert len(cache["http.token"].strip()) >= 40
    assert re.fullmatch(r"[0-9a-f]{64}", cache["remote.key"].strip())
    assert allowed_keys(k8s_cluster, namespace) == [client_public]
    owner = k8s_cluster.get("lmcc", "cache", namespace)
    assert owner is not None
    secrets = {}
    for name in (CACHE_SECRET, CLIENT_SECRET):
        secret = k8s_cluster.get("secret", name, namespace)
        assert secret is not None and secret["type"] == "Opaque"
        (ref,) = secret["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == (
            "LMCacheCluster",
            owner["metadata"]["uid"],
            True,
        )
        secrets[name] = secret["metadata"]["resourceVersion"]

    status = credentials(k8s_cluster, namespace)
    assert (status["cacheSecret"], status["clientSecret"], status["keysConfigMap"]) == (
        CACHE_SECRET,
        CLIENT_SECRET,
        KEYS,
    )
    assert status["serverKey"] == {"publicKey": server_public, "fingerprint": server_public[:8]}
    (key,) = status["clientKeys"]
    assert (key["publicKey"], key["fingerprint"], key["state"]) == (
        client_public,
        client_public[:8],
        "active",
    )
    assert status["consumerKey"] == client_public[:8]
    assert "rotation" not in status

    # the cache pods mount them, and roll when the server key changes
    template = obj(k8s_cluster, "daemonset", "cache-cache", namespace)["spec"]["template"]
    assert template["metadata"]["annotations"]["lmcache.dev/server-key"] == server_public[:8]
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["credentials"]["secret"] == {"secretName": CACHE_SECRET, "defaultMode": 0o440}
    assert volumes["keys"]["configMap"]["name"] == KEYS

    # a restarted operator knows them from the status: nothing is made again
    operator.stop()
    operator.start()
    wait_ready(k8s_cluster, namespace)
    k8s_cluster.apply(manifest(cpu="3Gi"), namespace)  # a reconcile of the new generation
    wait_ready(k8s_cluster, namespace, generation=2)
    for name, version in secrets.items():
        assert obj(k8s_cluster, "secret", name, namespace)["metadata"]["resourceVersion"] == version
    assert credentials(k8s_cluster, namespace)["serverKey"]["publicKey"] == server_public
    operator.stop()
    requests = operator.api_requests()
    assert requests.get("POST secrets", 0) >= 2
    assert not {r for r in requests if r.split(" ")[-1].startswith("secrets")} - {
        "POST secrets",
        "DELETE secrets",
        "PATCH secrets",
    }, requests


def test_secrets_whose_keys_the_operator_does_not_know_are_replaced(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    """As after a crash between creating the Secrets and recording their public keys."""
    for name in (CACHE_SECRET, CLIENT_SECRET):
        k8s_cluster.kubectl(
            "create", "secret", "generic", name, "-n", namespace, "--from-literal=x=y"
        )
    before = {
        n: obj(k8s_cluster, "secret", n, namespace)["metadata"]["uid"]
        for n in (CACHE_SECRET, CLIENT_SECRET)
    }
    k8s_cluster.apply(manifest(), namespace)
    wait_ready(k8s_cluster, namespace)
    server_public, _ = check_pair(k8s_cluster, namespace)
    assert credentials(k8s_cluster, namespace)["serverKey"]["publicKey"] == server_public
    for name, uid in before.items():
        assert obj(k8s_cluster, "secret", name, namespace)["metadata"]["uid"] != uid
    assert repaired_secrets(operator) == 2


def test_a_deleted_client_secret_regenerates_the_pair_and_rolls_the_cache_pods(
    k8s_cluster: Cluster, namespace: str, fast_operator: OperatorProcess
) -> None:
    k8s_cluster.apply(manifest(), namespace)
    wait_ready(k8s_cluster, namespace)
    old_server, old_client = check_pair(k8s_cluster, namespace)
    daemonset = k8s_cluster.get("daemonset", "cache-cache", namespace)
    assert daemonset is not None
    generation = daemonset["metadata"]["generation"]

    k8s_cluster.kubectl("delete", "secret", CLIENT_SECRET, "-n", namespace)
    status = wait_until(
        lambda: (
            (c := credentials(k8s_cluster, namespace))["serverKey"]["publicKey"] != old_server and c
        ),
        30,
        "new keys in status.credentials",
    )
    server_public, client_public = check_pair(k8s_cluster, namespace)  # a whole new pair
    assert server_public == status["serverKey"]["publicKey"]
    assert client_public != old_client
    assert allowed_keys(k8s_cluster, namespace) == [client_public]

    def rolled() -> dict[str, Any] | None:
        ds = k8s_cluster.get("daemonset", "cache-cache", namespace) or {}
        annotations = ds["spec"]["template"]["metadata"]["annotations"]
        return ds if annotations["lmcache.dev/server-key"] == server_public[:8] else None

    assert (
        wait_until(rolled, 30, "the DaemonSet template to carry the new server key")["metadata"][
            "generation"
        ]
        > generation
    )
    wait_ready(k8s_cluster, namespace)  # the pods rolled (the cluster's generation is the same)
    assert repaired_secrets(fast_operator) == 2


def _client_key_annotation(k8s: Cluster, ns: str) -> str:
    deployment = k8s.get("deployment", "llm", ns) or {}
    annotations = deployment.get("spec", {}).get("template", {}).get("metadata", {})
    return str((annotations.get("annotations") or {}).get("lmcache.dev/client-key", ""))


def test_rotation_allows_both_keys_rolls_the_consumers_then_drops_the_old_key(
    k8s_cluster: Cluster, namespace: str, fast_operator: OperatorProcess
) -> None:
    k8s_cluster.apply(cache_manifest(port=7300), namespace)
    wait_cache_ready(k8s_cluster, namespace)
    k8s_cluster.apply(vllm_manifest(replicas=2), namespace)
    wait_vllm(k8s_cluster, namespace, "Ready", lambda s: s.get("readyReplicas") == 2)
    server_public, old_client = check_pair(k8s_cluster, namespace)
    wait_until(
        lambda: _client_key_annotation(k8s_cluster, namespace) == old_client[:8],
        30,
        "the consumer's pods to carry the client key",
    )
    daemonset = obj(k8s_cluster, "daemonset", "cache-cache", namespace)
    daemonset_generation = daemonset["metadata"]["generation"]
    with (
        StatusRecorder(k8s_cluster, namespace, "cache") as recorder,
        ConfigMapRecorder(k8s_cluster, namespace, KEYS, "clients.pub") as allowed,
    ):
        wait_until(lambda: allowed.seen, 30, "the watch of clients.pub listing it")
        k8s_cluster.kubectl(
            "annotate", "lmcc", "cache", "-n", namespace, "lmcache.dev/rotate-keys=r1"
        )
        # the client Secret has the new key (server.pub unchanged) and the servers allow both
        new_client = wait_until(
            lambda: (
                (k := secret_data(k8s_cluster, namespace, CLIENT_SECRET)["client.pub"].strip())
                != old_client
                and k
            ),
            30,
            "a new client key in the Secret",
        )
        _, client_public = check_pair(k8s_cluster, namespace)
        assert client_public == new_client
        assert (
            server_public
            == secret_data(k8s_cluster, namespace, CLIENT_SECRET)["server.pub"].strip()
        )
        # watched, not polled: with a 3 s propagation delay and consumers that roll at once,
        # the servers may allow both keys for only a few seconds
        both = wait_until(
            lambda: next(
                (keys for keys in map(keys_of, allowed.seen)
                 if set(keys) == {old_client, new_client}),
                None,
            ),
            10,
            "clients.pub with the old and the new key",
        )  # fmt: skip
        assert both[-1] == new_client
        # the consumer rolls to the new key, then the old one is dropped
        wait_until(
            lambda: _client_key_annotation(k8s_cluster, namespace) == new_client[:8],
            30,
            "the consumer Deployment's template to carry the new key",
        )
        done = recorder.wait(
            "the rotation Completed",
            lambda s: (s.get("credentials") or {}).get("rotation", {}).get("phase") == "Completed",
            timeout=60,
        )
        phases = [
            (s.get("credentials") or {}).get("rotation", {}).get("phase") for s in recorder.seen
        ]
    assert {"Propagating", "RollingConsumers", "Completed"} <= set(phases), phases
    rolling = next(
        s["credentials"]
        for s in recorder.seen
        if (s.get("credentials") or {}).get("rotation", {}).get("phase") == "RollingConsumers"
    )
    assert [(k["publicKey"], k["state"]) for k in rolling["clientKeys"]] == [
        (old_client, "retiring"),
        (new_client, "active"),
    ]
    rotation = done["credentials"]["rotation"]
    assert rotation["requested"] == "r1" and rotation["completedAt"]
    assert "every consumer runs the new key" in rotation["message"]
    assert [k["publicKey"] for k in done["credentials"]["clientKeys"]] == [new_client]
    assert done["credentials"]["consumerKey"] == new_client[:8]
    # the consumer Deployment had rolled out when the old key went
    deployment = k8s_cluster.get("deployment", "llm", namespace)
    assert deployment is not None
    assert deployment["status"]["updatedReplicas"] == deployment["status"]["availableReplicas"] == 2
    wait_until(
        lambda: allowed_keys(k8s_cluster, namespace) == [new_client],
        10,
        "clients.pub with the new key only",
    )
    # the servers re-read the key file: the cache pods did not roll
    assert (
        obj(k8s_cluster, "daemonset", "cache-cache", namespace)["metadata"]["generation"]
        == daemonset_generation
    )
    # the same value again is no new request
    k8s_cluster.kubectl(
        "annotate", "lmcc", "cache", "-n", namespace, "lmcache.dev/rotate-keys=r1", "--overwrite"
    )
    assert secret_data(k8s_cluster, namespace, CLIENT_SECRET)["client.pub"].strip() == new_client


def test_vllm_pods_mount_the_client_keys(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    k8s_cluster.apply(cache_manifest(port=7310), namespace)
    wait_cache_ready(k8s_cluster, namespace)
    k8s_cluster.apply(vllm_manifest(replicas=1), namespace)
    wait_vllm(k8s_cluster, namespace, "Ready", lambda s: s.get("readyReplicas") == 1)
    pods = k8s_cluster.items("pods", namespace, "lmcache.dev/vllm-deployment=llm")
    spec = next(p for p in pods if not p["metadata"].get("deletionTimestamp"))["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["lmcache-client-credentials"]["secret"] == {
        "secretName": CLIENT_SECRET,
        "defaultMode": 0o440,
    }
    container = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LMCACHE_NODE_CREDENTIALS_DIR"] == "/var/run/lmcache/client"
    assert {
        "name": "lmcache-client-credentials",
        "mountPath": "/var/run/lmcache/client",
        "readOnly": True,
    } in container["volumeMounts"]
    assert json.dumps(spec["securityContext"]["fsGroup"]) == json.dumps(
        spec["securityContext"]["supplementalGroups"][0]
    )
