"""Wiring foreign pods (builders/injection.py) and the admission answer (controllers)."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from typing import Any

import jsonpatch
import pytest
import yaml
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.builders.connection import (
    CLIENT_DIR,
    Connection,
    build_connection_configmap,
    kv_transfer_json,
)
from lmcache_operator.builders.injection import (
    ARGS_ANNOTATION,
    CONTAINER_ANNOTATION,
    FAILED,
    INJECTED,
    INJECTION_ANNOTATION,
    INSTALL_ANNOTATION,
    MESSAGE_ANNOTATION,
    PARTIAL,
    REPORTED_ANNOTATION,
    already_handled,
    inject,
    vllm_command,
)
from lmcache_operator.controllers.injection import (
    AdmissionController,
    Lookups,
    needs_report,
    report_message,
)
from lmcache_operator.metrics import OperatorMetrics

GROUP = LMCacheClusterSpec.model_validate({}).group("ml", "cache")


def connection(**spec: Any) -> Connection:
    return Connection.from_cluster("cache", "ml", LMCacheClusterSpec.model_validate(spec))


def pod(
    command: list[str] | None = None,
    args: list[str] | None = None,
    *,
    annotations: dict[str, str] | None = None,
    **container: Any,
) -> dict[str, Any]:
    main: dict[str, Any] = {"name": "main", "image": "vllm/vllm-openai:v0.32.0", **container}
    if command is not None:
        main["command"] = command
    if args is not None:
        main["args"] = args
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "llm-",
            "namespace": "ml",
            "labels": {"lmcache.dev/cluster": "cache", "app": "llm"},
            "annotations": dict(annotations or {}),
        },
        "spec": {"containers": [{"name": "sidecar", "image": "proxy"}, main]},
    }


def main_container(wired: dict[str, Any]) -> dict[str, Any]:
    return dict(wired["spec"]["containers"][1])


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def test_vllm_serve_gets_everything() -> None:
    original = pod(["vllm", "serve"], ["org/model", "--port", "8000"])
    snapshot = copy.deepcopy(original)
    result = inject(original, connection())
    assert original == snapshot  # a new object
    assert result.outcome == INJECTED, result.message
    container = main_container(result.pod)
    assert container["args"] == ["org/model", "--port", "8000", "--kv-transfer-config",
                                 kv_transfer_json()]  # fmt: skip
    env = env_of(container)
    assert env["HOST_IP"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert env["LMCACHE_NODE_HOST"] == "tcp://$(HOST_IP)"
    assert env["LMCACHE_NODE_CREDENTIALS_DIR"] == CLIENT_DIR
    assert env["PYTHONPATH"] == "/opt/lmcache-connector"
    assert container["env"][0]["name"] == "HOST_IP"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"] == "lmcache-shm" and mounts[CLIENT_DIR]
    spec = result.pod["spec"]
    assert "env" not in spec["containers"][0]  # the sidecar is left alone
    assert {v["name"] for v in spec["volumes"]} == set(mounts.values())
    assert [c["name"] for c in spec["initContainers"]] == ["install-connector"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}  # the cluster's nodes
    assert spec["securityContext"] == {"supplementalGroups": [GROUP], "fsGroup": GROUP}
    meta = result.pod["metadata"]
    assert meta["annotations"][INJECTION_ANNOTATION] == INJECTED
    assert meta["annotations"][MESSAGE_ANNOTATION] == "wired to its node's cache server"
    assert already_handled(result.pod)  # a second review changes nothing


@pytest.mark.parametrize(
    "command",
    [
        ["/usr/local/bin/vllm", "serve", "org/model"],
        ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"],
        ["lmcache-node", "vllm", "org/model"],
    ],
)
def test_each_form_of_vllms_cli_is_recognised(command: list[str]) -> None:
    assert vllm_command({"command": command}) == "cli"
    result = inject(pod(command), connection())
    assert result.outcome == INJECTED
    assert main_container(result.pod)["args"][-2] == "--kv-transfer-config"


def test_image_entrypoint_gets_env_only_unless_annotated() -> None:
    result = inject(pod(None, ["org/model"]), connection())
    assert result.outcome == PARTIAL
    assert "has no command" in result.message
    assert f"{ARGS_ANNOTATION}=append" in result.message
    container = main_container(result.pod)
    assert container["args"] == ["org/model"]
    assert "LMCACHE_NODE_PORT" in env_of(container)  # env and volumes are there anyway
    annotated = pod(None, ["org/model"], annotations={ARGS_ANNOTATION: "append"})
    wired = inject(annotated, connection())
    assert wired.outcome == INJECTED
    assert main_container(wired.pod)["args"][-2:] == ["--kv-transfer-config", kv_transfer_json()]


def test_a_shell_or_an_existing_kv_config_is_left_as_it_is() -> None:
    shell = inject(pod(["/bin/sh", "-c", "exec vllm serve m"]), connection())
    assert shell.outcome == PARTIAL and "shell script" in shell.message
    assert main_container(shell.pod)["command"] == ["/bin/sh", "-c", "exec vllm serve m"]
    theirs = pod(["vllm", "serve"], ["m", '--kv-transfer-config={"kv_connector":"NixlConnector"}'])
    result = inject(theirs, connection())
    assert result.outcome == PARTIAL and "already has a --kv-transfer-config" in result.message
    assert main_container(result.pod)["args"] == theirs["spec"]["containers"][1]["args"]


def test_the_containers_own_settings_win_and_are_named() -> None:
    mine = [
        {"name": "LMCACHE_NODE_PORT", "value": "7000"},
        {"name": "PYTHONPATH", "value": "/app"},
    ]
    result = inject(pod(["vllm", "serve"], env=mine), connection())
    env = env_of(main_container(result.pod))
    assert env["LMCACHE_NODE_PORT"] == "7000"
    assert env["PYTHONPATH"] == "/opt/lmcache-connector:/app"
    assert "kept the container's own LMCACHE_NODE_PORT" in result.message
    # a container defining HOST_IP itself: the variables using it come after it
    own_ip = [{"name": "HOST_IP", "value": "10.0.0.9"}]
    names = [e["name"] for e in main_container(inject(pod(["vllm", "serve"], env=own_ip),
                                                      connection()).pod)["env"]]  # fmt: skip
    assert names.index("LMCACHE_NODE_HOST") > names.index("HOST_IP") == 0


def test_an_existing_shm_mount_is_replaced_by_the_hosts() -> None:
    original = pod(["vllm", "serve"], volumeMounts=[{"name": "dshm", "mountPath": "/dev/shm/"}])
    original["spec"]["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    result = inject(original, connection())
    mounts = main_container(result.pod)["volumeMounts"]
    assert [m["name"] for m in mounts if m["mountPath"].rstrip("/") == "/dev/shm"] == [
        "lmcache-shm"
    ]
    assert "replaced the container's mount of volume 'dshm'" in result.message
    assert result.outcome == INJECTED  # a replaced emptyDir still serves the pod's own use


def test_conflicts_and_opt_outs() -> None:
    clash = pod(["vllm", "serve"])
    clash["spec"]["nodeSelector"] = {"nvidia.com/gpu.present": "false"}
    clash["spec"]["securityContext"] = {"fsGroup": 1234, "supplementalGroups": [5]}
    result = inject(clash, connection())
    assert result.outcome == PARTIAL and "may run where no cache server does" in result.message
    assert result.pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "false"}
    assert result.pod["spec"]["securityContext"] == {"fsGroup": 1234,
                                                     "supplementalGroups": [5, GROUP]}  # fmt: skip
    taken = pod(["vllm", "serve"])
    taken["spec"]["volumes"] = [{"name": "lmcache-shm", "emptyDir": {}}]
    result = inject(taken, connection())
    assert result.outcome == PARTIAL and "a volume named 'lmcache-shm'" in result.message
    assert result.pod["spec"]["volumes"][0] == {"name": "lmcache-shm", "emptyDir": {}}
    no_install = inject(pod(["vllm", "serve"], annotations={INSTALL_ANNOTATION: "false"}),
                        connection())  # fmt: skip
    assert "initContainers" not in no_install.pod["spec"]
    assert "PYTHONPATH" not in env_of(main_container(no_install.pod))


def test_the_named_container_and_clusters_vllm_cannot_reach() -> None:
    chosen = pod(None, annotations={CONTAINER_ANNOTATION: "sidecar"})
    result = inject(chosen, connection())
    assert "LMCACHE_NODE_HOST" in env_of(result.pod["spec"]["containers"][0])
    missing = inject(pod(None, annotations={CONTAINER_ANNOTATION: "nope"}), connection())
    assert missing.outcome == FAILED and "names no container" in missing.message
    assert "env" not in main_container(missing.pod)
    isolated = inject(pod(["vllm", "serve"]), connection(hostNetwork=False))
    assert isolated.outcome == FAILED and "hostNetwork" in isolated.message


def test_pods_of_the_operator_are_never_touched() -> None:
    ours = pod(["vllm", "serve"])
    ours["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "lmcache-operator"
    assert already_handled(ours)
    assert not needs_report(ours)


# ---- the admission answer ----------------------------------------------------------------


class ApiStub:
    """What Lookups reads: a ConfigMap and a namespace (a stub: review() is pure logic)."""

    def __init__(self, objects: dict[tuple[str, str | None, str], dict[str, Any]]) -> None:
        self.objects = objects
        self.reads = 0

    async def get(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        self.reads += 1
        return self.objects.get((kind, namespace, name))


def review(pod_object: dict[str, Any], uid: str = "u-1") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": uid, "operation": "CREATE", "namespace": "ml", "object": pod_object},
    }


def answer(api: ApiStub, body: dict[str, Any], webhook: str = "pods") -> dict[str, Any]:
    controller = AdmissionController(Lookups(api), OperatorMetrics())  # type: ignore[arg-type]
    return asyncio.run(controller.review(body, webhook))


def patched(original: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["response"]["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["response"]["patch"]))
    result: dict[str, Any] = jsonpatch.apply_patch(original, patch)
    return result


def test_review_answers_with_a_patch_that_wires_the_pod() -> None:
    spec = LMCacheClusterSpec.model_validate({})
    configmap = build_connection_configmap("cache", "ml", spec)
    api = ApiStub({("ConfigMap", "ml", "cache-connection"): configmap})
    original = pod(["vllm", "serve"], ["m"])
    response = answer(api, review(original))
    assert response["kind"] == "AdmissionReview"
    assert response["response"]["uid"] == "u-1" and response["response"]["allowed"] is True
    assert patched(original, response) == inject(original, connection()).pod
    assert "warnings" not in response["response"]


def test_review_never_blocks_and_says_why_it_did_not_wire() -> None:
    api = ApiStub({})
    original = pod(["vllm", "serve"])
    response = answer(api, review(original))
    assert response["response"]["allowed"] is True
    wired = patched(original, response)
    annotations = wired["metadata"]["annotations"]
    assert annotations[INJECTION_ANNOTATION] == FAILED
    assert "ConfigMap cache-connection does not exist" in annotations[MESSAGE_ANNOTATION]
    assert wired["spec"] == original["spec"]
    assert response["response"]["warnings"][0].startswith("lmcache: no LMCacheCluster 'cache'")
    # not a pod creation, or a pod not opted in: allowed, no patch
    update = review(original)
    update["request"]["operation"] = "UPDATE"
    assert "patch" not in answer(api, update)["response"]
    unlabelled = pod(["vllm", "serve"])
    del unlabelled["metadata"]["labels"]["lmcache.dev/cluster"]
    assert "patch" not in answer(api, review(unlabelled))["response"]
    assert answer(api, {"not": "a review"})["response"]["allowed"] is True


def test_namespace_label_names_the_cluster() -> None:
    spec = LMCacheClusterSpec.model_validate({})
    api = ApiStub(
        {
            ("ConfigMap", "ml", "cache-connection"): build_connection_configmap(
                "cache", "ml", spec
            ),
            ("Namespace", None, "ml"): {"metadata": {"labels": {"lmcache.dev/cluster": "cache"}}},
        }
    )
    original = pod(["vllm", "serve"])
    del original["metadata"]["labels"]["lmcache.dev/cluster"]
    wired = patched(original, answer(api, review(original), webhook="namespaces"))
    assert wired["metadata"]["labels"]["lmcache.dev/cluster"] == "cache"  # seen by the reporter
    assert wired["metadata"]["annotations"][INJECTION_ANNOTATION] == INJECTED


def test_lookups_are_cached_for_a_few_seconds() -> None:
    now = [0.0]
    api = ApiStub({})
    lookups = Lookups(api, ttl_s=5.0, clock=lambda: now[0])  # type: ignore[arg-type]

    async def twice() -> None:
        await lookups.connection("ml", "cache")
        await lookups.connection("ml", "cache")
        now[0] = 6.0
        await lookups.connection("ml", "cache")

    asyncio.run(twice())
    assert api.reads == 2


def test_reports_name_the_reason() -> None:
    failed = inject(pod(["vllm", "serve"]), connection(hostNetwork=False)).pod
    assert needs_report(failed)
    reason, message = report_message(failed)
    assert reason == "LMCacheInjectionFailed" and "hostNetwork" in message
    unseen = pod(["vllm", "serve"])
    reason, message = report_message(unseen)
    assert reason == "LMCacheNotInjected" and "did not see it" in message
    unseen["metadata"]["annotations"][REPORTED_ANNOTATION] = "2026-01-01T00:00:00Z"
    assert not needs_report(unseen)
    assert not needs_report(inject(pod(["vllm", "serve"]), connection()).pod)


def test_yaml_of_the_contract_is_readable() -> None:
    data = build_connection_configmap("cache", "ml", LMCacheClusterSpec.model_validate({}))["data"]
    assert data["env"].startswith("- name: HOST_IP\n")
    assert yaml.safe_load(data["productionStackValues"])["servingEngineSpec"]
