"""Children deleted or edited by hand are restored (real API server, kwok nodes)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.operator.conftest import OperatorProcess
from tests.operator.kubectl import Cluster
from tests.operator.test_cluster import manifest, wait_ready
from tests.operator.test_vllm_cluster import (
    cache_manifest,
    condition,
    vllm_manifest,
    wait_cache_ready,
    wait_vllm,
)
from tests.support import wait_until

pytestmark = pytest.mark.k8s


def _get(k8s: Cluster, kind: str, name: str, ns: str) -> dict[str, Any]:
    return k8s.get(kind, name, ns) or {}


def _restored(
    k8s: Cluster, kind: str, name: str, ns: str, *, check: Any, what: str
) -> dict[str, Any]:
    return wait_until(
        lambda: (o := k8s.get(kind, name, ns)) and check(o) and o, 30, f"{kind}/{name} {what}"
    )


def _repaired(operator: OperatorProcess, kind: str) -> float:
    match = re.search(
        rf'^lmcache_operator_children_repaired_total{{kind="{kind}"}} (\S+)$',
        operator.metrics(),
        re.MULTILINE,
    )
    return float(match.group(1)) if match else 0.0


def test_cluster_children_deleted_or_edited_are_restored(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    k8s_cluster.apply(manifest(), namespace)
    wait_ready(k8s_cluster, namespace)
    config = _get(k8s_cluster, "configmap", "cache-cache-config", namespace)["data"]

    k8s_cluster.kubectl("delete", "configmap", "cache-cache-config", "-n", namespace)
    _restored(
        k8s_cluster, "configmap", "cache-cache-config", namespace,
        check=lambda o: o["data"] == config, what="recreated",
    )  # fmt: skip
    k8s_cluster.kubectl(
        "patch", "configmap", "cache-cache-config", "-n", namespace, "--type=merge",
        "-p", json.dumps({"data": {"config.yaml": "max_local_cpu_size: 1\n"}}),
    )  # fmt: skip
    _restored(
        k8s_cluster, "configmap", "cache-cache-config", namespace,
        check=lambda o: o["data"] == config, what="edit reverted",
    )  # fmt: skip

    for service in ("cache-cache", "cache-cache-metrics"):
        k8s_cluster.kubectl("delete", "service", service, "-n", namespace)
        _restored(k8s_cluster, "service", service, namespace, check=bool, what="recreated")
    k8s_cluster.kubectl(
        "patch", "service", "cache-cache", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"internalTrafficPolicy": "Cluster"}}),
    )  # fmt: skip
    _restored(
        k8s_cluster, "service", "cache-cache", namespace,
        check=lambda o: o["spec"]["internalTrafficPolicy"] == "Local", what="edit reverted",
    )  # fmt: skip

    # a hand edit of the DaemonSet's pod template is reverted; a label of someone else stays
    k8s_cluster.kubectl("label", "daemonset", "cache-cache", "-n", namespace, "team=blue")
    k8s_cluster.kubectl(
        "set", "image", "daemonset/cache-cache", "-n", namespace, "lmcache-node=evil:1"
    )
    ds = _restored(
        k8s_cluster, "daemonset", "cache-cache", namespace,
        check=lambda o: o["spec"]["template"]["spec"]["containers"][0]["image"]
        == "lmcache.local/node:dev",
        what="image edit reverted",
    )  # fmt: skip
    assert ds["metadata"]["labels"]["team"] == "blue"
    k8s_cluster.kubectl("delete", "daemonset", "cache-cache", "-n", namespace, "--wait=false")
    wait_until(
        lambda: (
            _get(k8s_cluster, "daemonset", "cache-cache", namespace).get("metadata", {}).get("uid")
            not in (None, ds["metadata"]["uid"])
        ),
        30,
        "a new DaemonSet",
    )
    wait_ready(k8s_cluster, namespace)
    assert _repaired(operator, "ConfigMap") >= 2
    assert _repaired(operator, "Service") >= 3
    assert _repaired(operator, "DaemonSet") >= 2


def test_vllm_children_are_restored_and_a_scale_is_left_alone(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    k8s_cluster.apply(cache_manifest(port=5600), namespace)
    wait_cache_ready(k8s_cluster, namespace)
    k8s_cluster.apply(vllm_manifest(replicas=1), namespace)
    wait_vllm(
        k8s_cluster, namespace, "Ready", lambda s: condition(s, "Ready").get("status") == "True"
    )
    k8s_cluster.kubectl("delete", "service", "llm", "-n", namespace)
    _restored(k8s_cluster, "service", "llm", namespace, check=bool, what="recreated")

    # kubectl scale (as an HPA would, through the scale subresource) is another manager's
    k8s_cluster.kubectl("scale", "deployment", "llm", "-n", namespace, "--replicas=2")
    k8s_cluster.kubectl(
        "patch", "deployment", "llm", "-n", namespace, "--type=json",
        "-p", json.dumps([{"op": "replace", "path": "/spec/template/spec/containers/0/image",
                           "value": "evil:1"}]),
    )  # fmt: skip
    deployment = _restored(
        k8s_cluster, "deployment", "llm", namespace,
        check=lambda o: o["spec"]["template"]["spec"]["containers"][0]["image"] != "evil:1",
        what="image edit reverted",
    )  # fmt: skip
    assert deployment["spec"]["replicas"] == 2  # the scale stays
    k8s_cluster.kubectl("delete", "deployment", "llm", "-n", namespace, "--wait=false")
    wait_until(
        lambda: (
            _get(k8s_cluster, "deployment", "llm", namespace).get("metadata", {}).get("uid")
            not in (None, deployment["metadata"]["uid"])
        ),
        30,
        "a new Deployment",
    )
    wait_vllm(
        k8s_cluster, namespace, "Ready again",
        lambda s: condition(s, "Ready").get("status") == "True",
    )  # fmt: skip
    assert _repaired(operator, "Deployment") >= 2
    assert _repaired(operator, "Service") >= 1
