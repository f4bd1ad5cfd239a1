"""The integration examples (manifests/examples/) hold the contract the operator publishes.

production-stack, KServe and llm-d are documentation examples (not run here): these tests keep
them equal to what `lmcache-operator connection` builds for manifests/examples/lmcachecluster.yaml
in namespace default, and the plain Deployment to what the webhook wires completely."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.builders.connection import (
    Connection,
    env,
    init_containers,
    kv_transfer_args,
    pod_security_context,
    volume_mounts,
    volumes,
)
from lmcache_operator.builders.injection import INJECTED, inject, vllm_command

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "manifests" / "examples"


def load(name: str) -> list[Any]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text("utf-8")) if d]


def contract() -> Connection:
    (cluster,) = load("lmcachecluster.yaml")
    spec = LMCacheClusterSpec.model_validate(cluster["spec"])
    return Connection.from_cluster(cluster["metadata"]["name"], "default", spec)


def test_the_plain_deployment_is_wired_completely_by_the_webhook() -> None:
    deployment = next(d for d in load("vllm-plain-deployment.yaml") if d["kind"] == "Deployment")
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"]["lmcache.dev/cluster"] == contract().cluster
    pod = {"metadata": dict(template["metadata"]), "spec": template["spec"]}
    result = inject(pod, contract())
    assert result.outcome == INJECTED, result.message


def test_production_stack_values_hold_the_contract() -> None:
    (values,) = load("integrations/production-stack-values.yaml")
    conn = contract()
    engine = values["servingEngineSpec"]
    assert engine["securityContext"] == pod_security_context(conn)
    (model,) = engine["modelSpec"]
    assert model["vllmConfig"]["extraArgs"][-2:] == kv_transfer_args()
    assert model["env"] == env(conn)
    assert model["extraVolumes"] == volumes(conn)
    assert model["extraVolumeMounts"] == volume_mounts()
    init = init_containers(conn)[0]
    assert model["initContainer"]["image"] == init["image"]
    assert model["initContainer"]["command"] == init["command"]
    assert "lmcacheConfig" not in model  # LMCache's own connector would be wired too
    assert "tensorParallelSize" not in model["vllmConfig"]  # its own /dev/shm mount


def test_kserve_template_holds_the_contract() -> None:
    (service,) = load("integrations/kserve-llminferenceservice.yaml")
    assert service["kind"] == "LLMInferenceService"
    conn = contract()
    template = service["spec"]["template"]
    (main,) = template["containers"]
    assert main["name"] == "main"  # KServe's vLLM container
    assert main["args"][-2:] == kv_transfer_args()
    assert main["env"] == env(conn)
    assert main["volumeMounts"] == volume_mounts()
    assert template["volumes"] == volumes(conn)
    assert template["initContainers"] == init_containers(conn)
    assert template["securityContext"] == pod_security_context(conn)
    assert template["nodeSelector"] == dict(conn.node_selector)


def test_llm_d_values_ask_the_webhook_with_vllm_serve() -> None:
    (values,) = load("integrations/llm-d-values.yaml")
    assert values["modelArtifacts"]["labels"]["lmcache.dev/cluster"] == contract().cluster
    (container,) = values["decode"]["containers"]
    assert container["modelCommand"] == "vllmServe"  # the chart's command: vllm serve
    assert vllm_command({"command": ["vllm", "serve"], "args": container["args"]}) == "cli"
    assert not any("kv-transfer-config" in a for a in container["args"])  # the webhook adds it
