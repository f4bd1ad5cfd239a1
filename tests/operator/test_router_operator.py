"""A VLLMDeployment's router (spec.router) made, repaired and removed by the operator, on a
real API server with kwok nodes."""

from __future__ import annotations

import itertools
import json

import pytest

from tests.operator.conftest import OperatorProcess
from tests.operator.kubectl import Cluster
from tests.support import wait_until

pytestmark = pytest.mark.k8s

CACHE = """
apiVersion: lmcache.dev/v1alpha1
kind: LMCacheCluster
metadata: {{name: cache}}
spec:
  image: {{repository: lmcache.local/node, tag: dev, pullPolicy: Never}}
  server: {{port: {port}, httpPort: {http_port}, eventsPort: {events_port}}}
"""
VLLM = """
apiVersion: lmcache.dev/v1alpha1
kind: VLLMDeployment
metadata: {name: llm}
spec:
  model: {name: org/model}
  replicas: 1
  resources: {gpus: 1}
  cache: {clusterRef: {name: cache}}
  router: {enabled: true, replicas: 2, policy: session}
"""
KINDS = ("serviceaccount", "role", "rolebinding", "service", "deployment")
_PORTS = itertools.count(26000, 3)


def router_objects(k8s: Cluster, ns: str) -> dict[str, dict[str, object] | None]:
    return {kind: k8s.get(kind, "llm-router", ns) for kind in KINDS}


def router_url(k8s: Cluster, ns: str) -> str | None:
    body = k8s.get("vllmd", "llm", ns)
    return None if body is None else ((body.get("status") or {}).get("routerUrl"))


def test_router_children_made_repaired_and_removed(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    port = next(_PORTS)
    k8s_cluster.apply(CACHE.format(port=port, http_port=port + 1, events_port=port + 2), namespace)
    k8s_cluster.apply(VLLM, namespace)
    url = f"http://llm-router.{namespace}.svc:8000/v1"
    wait_until(lambda: router_url(k8s_cluster, namespace) == url, 60, "status.routerUrl")
    objects = wait_until(
        lambda: (o := router_objects(k8s_cluster, namespace)) and all(o.values()) and o,
        30,
        "the five router children",
    )
    vllm = k8s_cluster.get("vllmd", "llm", namespace)
    assert vllm is not None
    for kind, obj in objects.items():
        assert obj is not None
        meta = obj["metadata"]
        assert isinstance(meta, dict)
        assert meta["labels"]["lmcache.dev/router"] == "llm", kind
        (owner,) = meta["ownerReferences"]
        assert (owner["kind"], owner["uid"]) == ("VLLMDeployment", vllm["metadata"]["uid"])
    # the router reads EndpointSlices and nothing else, as its own ServiceAccount
    role = objects["role"]
    assert role is not None
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
         "verbs": ["get", "list", "watch"]}
    ]  # fmt: skip
    deployment = objects["deployment"]
    assert deployment is not None
    pod = deployment["spec"]["template"]["spec"]  # type: ignore[index]
    assert pod["serviceAccountName"] == "llm-router"
    container = pod["containers"][0]
    assert container["image"] == "lmcache.local/node:dev"  # the cache cluster's node image
    args = container["args"]
    assert args[args.index("--cache-service") + 1] == "cache-cache"
    assert args[args.index("--policy") + 1] == "session"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["client-credentials"]["secret"]["secretName"] == "cache-client-credentials"
    wait_until(
        lambda: (
            (d := k8s_cluster.get("deployment", "llm-router", namespace))
            and (d.get("status") or {}).get("readyReplicas") == 2
        ),
        60,
        "the router's 2 pods ready",
    )
    # the vLLM Service and Deployment beside it are the VLLMDeployment's own, as before
    assert k8s_cluster.get("deployment", "llm", namespace) is not None
    assert k8s_cluster.get("service", "llm", namespace) is not None

    # self-healing: deleted or edited by hand, applied again
    k8s_cluster.kubectl("delete", "role", "llm-router", "-n", namespace)
    patch = {"spec": {"template": {"spec": {"serviceAccountName": "default"}}}}
    k8s_cluster.kubectl("patch", "deployment", "llm-router", "-n", namespace,
                        "--type=merge", "-p", json.dumps(patch))  # fmt: skip

    def repaired() -> bool:
        role_back = k8s_cluster.get("role", "llm-router", namespace)
        dep = k8s_cluster.get("deployment", "llm-router", namespace) or {}
        account = dep.get("spec", {}).get("template", {}).get("spec", {}).get("serviceAccountName")
        return role_back is not None and account == "llm-router"

    wait_until(repaired, 30, "the Role and the router Deployment restored")

    # switched off: every router child deleted, status.routerUrl empty; vLLM untouched
    vllm_uid = (k8s_cluster.get("deployment", "llm", namespace) or {})["metadata"]["uid"]
    k8s_cluster.kubectl("patch", "vllmd", "llm", "-n", namespace, "--type=merge",
                        "-p", json.dumps({"spec": {"router": {"enabled": False}}}))  # fmt: skip
    wait_until(
        lambda: not any(router_objects(k8s_cluster, namespace).values()),
        30,
        "the router's children deleted",
    )
    wait_until(lambda: router_url(k8s_cluster, namespace) == "", 30, "status.routerUrl emptied")
    deployment_after = k8s_cluster.get("deployment", "llm", namespace)
    assert deployment_after is not None and deployment_after["metadata"]["uid"] == vllm_uid
    # and nothing comes back (a removed child is not "repaired")
    assert not any(router_objects(k8s_cluster, namespace).values())


def test_a_name_too_long_for_the_router_is_refused_with_the_reason(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    name = "v" * 58  # fits the vLLM Service (63) but not <name>-router
    k8s_cluster.apply(VLLM.replace("name: llm", f"name: {name}"), namespace)

    def invalid() -> str | None:
        body = k8s_cluster.get("vllmd", name, namespace) or {}
        for condition in (body.get("status") or {}).get("conditions") or []:
            if condition["type"] == "ConfigValid" and condition["status"] == "False":
                return str(condition["message"])
        return None

    message = wait_until(invalid, 30, "ConfigValid=False")
    assert "too long for a router" in message, message
    assert k8s_cluster.get("deployment", f"{name}-router", namespace) is None
