"""spec.router: the API fields, the CRD's rule, and the router's pure builders."""

from __future__ import annotations

from typing import Any

import pytest
from lmcache_operator.api import ALL_KINDS
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.api.vllmdeployment import VLLMDeploymentSpec
from lmcache_operator.builders import router
from lmcache_operator.builders.lmcachecluster import build_daemonset, node_config
from lmcache_operator.builders.vllm_connector import CacheConnection
from lmcache_operator.builders.vllmdeployment import build_children as vllm_children
from lmcache_operator.crdgen import build_crd
from pydantic import ValidationError

CLUSTER = {"image": {"repository": "reg/node", "tag": "t1"}, "server": {"port": 6000}}


def spec_of(**fields: Any) -> VLLMDeploymentSpec:
    base: dict[str, Any] = {"model": {"name": "org/model"}, "cache": {"clusterRef": {"name": "c"}}}
    base.update(fields)
    return VLLMDeploymentSpec.model_validate(base)


def conn() -> CacheConnection:
    spec = LMCacheClusterSpec.model_validate(CLUSTER)
    return CacheConnection.from_cluster("c", spec, namespace="ns")


def kinds(spec: VLLMDeploymentSpec) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in router.build_children("llm", "ns", spec, conn())}


def test_defaults_are_off_two_replicas_cache_aware() -> None:
    spec = spec_of()
    assert not spec.router.enabled and spec.router.replicas == 2
    assert spec.router.policy == "cache-aware"
    assert router.build_children("llm", "ns", spec, conn()) == []


def test_children_in_apply_order_with_least_privilege() -> None:
    spec = spec_of(router={"enabled": True})
    children = router.build_children("llm", "ns", spec, conn())
    assert [o["kind"] for o in children] == [
        "ServiceAccount", "Role", "RoleBinding", "Service", "Deployment",
    ]  # fmt: skip
    assert {o["metadata"]["name"] for o in children} == {"llm-router"}
    role = children[1]
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]  # fmt: skip
    binding = children[2]
    assert binding["roleRef"]["name"] == "llm-router"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llm-router",
                                    "namespace": "ns"}]  # fmt: skip


def test_the_deployment_runs_the_node_image_with_discovery_and_credentials() -> None:
    spec = spec_of(router={"enabled": True, "replicas": 3, "policy": "session",
                           "extraArgs": ["--request-tokens", "32"]})  # fmt: skip
    deployment = kinds(spec)["Deployment"]
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "llm-router"
    (container,) = pod["containers"]
    assert container["image"] == "reg/node:t1"
    assert container["command"] == ["lmcache-node"]
    args = container["args"]
    flags = dict(zip(args[1::2], args[2::2], strict=False))
    assert args[0] == "router"
    assert flags["--service"] == "llm" and flags["--cache-service"] == "c-cache"
    assert flags["--policy"] == "session" and flags["--tokenizer"] == "org/model"
    assert flags["--model-name"] == "org/model"  # the connector's namespace model name
    assert args[-2:] == ["--request-tokens", "32"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LMCACHE_NODE_CREDENTIALS_DIR"] == "/var/run/lmcache/client"
    secret = next(v for v in pod["volumes"] if v["name"] == "client-credentials")
    assert secret["secret"]["secretName"] == "c-client-credentials"
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] and context["runAsNonRoot"]
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"},
                                      "limits": {"memory": "1Gi"}}  # fmt: skip


def test_router_pods_are_not_vllm_pods() -> None:
    """The vLLM Service and Deployment must never select the router's pods."""
    spec = spec_of(router={"enabled": True})
    vllm = {o["kind"]: o for o in vllm_children("llm", "ns", spec, conn())}
    selector = vllm["Service"]["spec"]["selector"]
    router_labels = kinds(spec)["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert not all(router_labels.get(k) == v for k, v in selector.items())
    assert kinds(spec)["Service"]["spec"]["selector"].items() <= router_labels.items()


def test_a_model_volume_is_mounted_for_a_local_tokenizer() -> None:
    spec = spec_of(
        model={"name": "/models/llama", "volume": {"source": {"persistentVolumeClaim":
                                                              {"claimName": "w"}}}},
        router={"enabled": True},
    )  # fmt: skip
    pod = kinds(spec)["Deployment"]["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": "/models", "readOnly": True}


def test_without_the_cache_the_image_must_be_given() -> None:
    with pytest.raises(ValidationError, match=r"router\.image is required"):
        VLLMDeploymentSpec.model_validate(
            {"model": {"name": "m"}, "cache": {"enabled": False}, "router": {"enabled": True}}
        )
    spec = VLLMDeploymentSpec.model_validate(
        {"model": {"name": "m"}, "cache": {"enabled": False},
         "router": {"enabled": True, "image": "reg/router:1"}}
    )  # fmt: skip
    deployment = router.build_deployment("llm", "ns", spec, None)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "reg/router:1" and "--cache-service" not in container["args"]


def test_bounds_and_names() -> None:
    with pytest.raises(ValidationError):
        spec_of(router={"enabled": True, "policy": "random"})
    with pytest.raises(ValidationError):
        spec_of(router={"replicas": 65})
    with pytest.raises(ValidationError):
        spec_of(router={"sessionHeader": "bad header"})
    assert router.name_problems("a" * 56) == []
    assert "at most 63" in router.name_problems("a" * 57)[0]
    assert router.router_url("llm", "ns", spec_of()) == "http://llm-router.ns.svc:8000/v1"


def test_the_crd_carries_the_router_and_its_rule() -> None:
    definition = next(d for d in ALL_KINDS if d.kind == "VLLMDeployment")
    crd = build_crd(definition)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    fields = spec["properties"]["router"]["properties"]
    assert fields["policy"]["enum"] == ["cache-aware", "round-robin", "prefix-hash", "session"]
    assert fields["replicas"]["maximum"] == 64
    assert any("router.image is required" in r["message"] for r in spec["x-kubernetes-validations"])
    assert "routerUrl" in schema["properties"]["status"]["properties"]


def test_the_cache_cluster_publishes_events_for_routers() -> None:
    spec = LMCacheClusterSpec.model_validate(CLUSTER)
    assert node_config("c", "ns", spec)["events_port"] == 5556
    container = build_daemonset("c", "ns", spec, "h")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "events", "containerPort": 5556, "protocol": "TCP"} in container["ports"]
    off = LMCacheClusterSpec.model_validate({**CLUSTER, "server": {"eventsPort": 0}})
    assert node_config("c", "ns", off)["events_port"] == 0
    ports = build_daemonset("c", "ns", off, "h")["spec"]["template"]["spec"]["containers"][0]
    assert all(p["name"] != "events" for p in ports["ports"])
