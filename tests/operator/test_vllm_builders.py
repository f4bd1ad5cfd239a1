"""VLLMDeployment: API model, CRD, pure builders, connector wiring and render."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lmcache_operator.api import ALL_KINDS
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.api.policy import PodPolicy
from lmcache_operator.api.vllmdeployment import VLLMDeploymentSpec
from lmcache_operator.builders.common import CONFIG_HASH_ANNOTATION
from lmcache_operator.builders.vllm_connector import (
    INSTALL_SCRIPT,
    SCHEDULING_GATE,
    WAIT_SCRIPT,
    CacheConnection,
    compatibility_problems,
)
from lmcache_operator.builders.vllmdeployment import build_children, name_problems
from lmcache_operator.cli import main as cli_main
from lmcache_operator.crdgen import build_crd
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "manifests" / "examples"
CLUSTER = {"image": {"repository": "reg/node", "tag": "t1"}, "server": {"port": 6000}}


def vllm_spec(**fields: Any) -> VLLMDeploymentSpec:
    base: dict[str, Any] = {"model": {"name": "org/model"}, "cache": {"clusterRef": {"name": "c"}}}
    base.update(fields)
    return VLLMDeploymentSpec.model_validate(base)


def conn_of(**fields: Any) -> CacheConnection:
    spec = LMCacheClusterSpec.model_validate(CLUSTER | fields)
    return CacheConnection.from_cluster("c", spec, namespace="ns")


def objects(spec: VLLMDeploymentSpec, conn: CacheConnection | None) -> dict[str, Any]:
    return {o["kind"]: o for o in build_children("llm", "ns", spec, conn)}


def pod_of(spec: VLLMDeploymentSpec, conn: CacheConnection | None) -> dict[str, Any]:
    pod: dict[str, Any] = objects(spec, conn)["Deployment"]["spec"]["template"]["spec"]
    return pod


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# ---- API -----------------------------------------------------------------------------------


def test_defaults() -> None:
    spec = vllm_spec()
    assert spec.replicas == 1 and spec.gpus == 1 and spec.device == "cuda"
    assert spec.image_reference == "docker.io/vllm/vllm-openai:v0.32.0"
    assert not spec.image_includes_connector
    assert spec.cache.kv_role == "kv_both" and spec.cache.load_failure_policy == "recompute"
    assert spec.placement.colocate_with_cache == "Required"
    cpu = vllm_spec(engine={"device": "cpu"})
    assert cpu.gpus == 0 and cpu.image_includes_connector
    assert cpu.image_reference == "ghcr.io/lmcache-k8s/lmcache-vllm-cpu:0.1.0"
    assert vllm_spec(parallelism={"tensor": 2, "pipeline": 2}).gpus == 4


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"resources": {"gpus": 1}, "parallelism": {"tensor": 2}}, "must be at least"),
        ({"engine": {"extraArgs": ["--kv-transfer-config", "{}"]}}, "must not contain"),
        ({"engine": {"extraArgs": ["--kv_transfer_config={}"]}}, "must not contain"),
        ({"replicas": -1}, "greater than or equal to 0"),
        ({"cache": {"enabled": True}}, "cache.clusterRef is required"),
        ({"modle": {}}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_specs_are_rejected(fields: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        vllm_spec(**fields)


def test_hand_written_connector_is_allowed_without_the_cache() -> None:
    spec = vllm_spec(cache={"enabled": False}, engine={"extraArgs": ["--kv-transfer-config", "{}"]})
    assert spec.engine.extra_args[0] == "--kv-transfer-config"
    cpu = vllm_spec(engine={"device": "cpu"}, resources={"gpus": 0}, parallelism={"tensor": 2})
    assert cpu.gpus == 0


def test_name_must_fit_a_service() -> None:
    assert name_problems("llama") == []
    assert "DNS-1035" in name_problems("1llama")[0]
    assert "DNS-1035" in name_problems("x" * 64)[0]


def test_crd_has_columns_scale_and_rules() -> None:
    kind = next(k for k in ALL_KINDS if k.kind == "VLLMDeployment")
    crd = build_crd(kind)
    assert crd["spec"]["names"]["shortNames"] == ["vllmd"]
    version = crd["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Ready",
        "Replicas",
        "Model",
        "Cache",
        "Age",
    ]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    root = version["schema"]["openAPIV3Schema"]
    assert root["required"] == ["spec"] and "default" not in root["properties"]["spec"]
    rules = " ".join(r["rule"] for r in root["properties"]["spec"]["x-kubernetes-validations"])
    assert "self.resources.gpus >=" in rules and "kv-transfer-config" in rules
    assert "self.replicas >= 0" in rules


# ---- builders ------------------------------------------------------------------------------


def test_connector_wiring_uses_the_nodes_ip_and_the_clusters_settings() -> None:
    conn = conn_of(server={"port": 6000, "chunkSize": 512, "transferMode": "engine"})
    spec = vllm_spec(cache={"clusterRef": {"name": "c"}, "kvRole": "kv_producer"})
    container = pod_of(spec, conn)["containers"][0]
    assert container["command"] == ["vllm", "serve"]
    args = container["args"]
    assert args[0] == "org/model"
    config = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert config == {
        "kv_connector": "LMCacheNodeConnector",
        "kv_connector_module_path": "lmcache_node.vllm.connector",
        "kv_role": "kv_producer",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "lmcache.node.host": "tcp://$(HOST_IP)",
            "lmcache.node.port": 6000,
            "lmcache.node.chunk_size": 512,
        },
    }
    assert container["env"][0] == {
        "name": "HOST_IP",
        "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}},
    }
    env = env_of(container)
    assert env["PYTHONHASHSEED"] == "0"
    assert env["LMCACHE_NODE_HOST"] == "tcp://$(HOST_IP)"
    assert (env["LMCACHE_NODE_PORT"], env["LMCACHE_CHUNK_SIZE"]) == ("6000", "512")
    assert env["LMCACHE_NODE_TRANSFER_MODE"] == "engine"
    assert not any(a.startswith("sh") for a in container["command"])  # no shell wrapper


def test_user_env_wins_and_pythonpath_keeps_the_connector_first() -> None:
    spec = vllm_spec(
        engine={
            "env": [
                {"name": "PYTHONHASHSEED", "value": "7"},
                {"name": "PYTHONPATH", "value": "/mine"},
            ]
        }
    )
    env = pod_of(spec, conn_of())["containers"][0]["env"]
    names = [e["name"] for e in env]
    assert names.count("PYTHONHASHSEED") == 1 and names.count("PYTHONPATH") == 1
    values = {e["name"]: e.get("value") for e in env}
    assert values["PYTHONHASHSEED"] == "7"
    assert values["PYTHONPATH"] == "/opt/lmcache-connector:/mine"


def test_shm_is_the_hosts_and_gpus_follow_the_device() -> None:
    pod = pod_of(vllm_spec(parallelism={"tensor": 2}), conn_of())
    assert {"name": "shm", "hostPath": {"path": "/dev/shm", "type": "Directory"}} in pod["volumes"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    # another tmpfs of the host: the cluster's hostShmPath, confined below its allowed prefix
    conn = conn_of(hostShmPath="/mnt/shm")
    pod = pod_of(vllm_spec(parallelism={"tensor": 2}), conn)
    assert {"name": "shm", "hostPath": {"path": "/mnt", "type": "DirectoryOrCreate"}} in pod[
        "volumes"
    ]
    assert not any("emptyDir" in v and v["name"] == "shm" for v in pod["volumes"])
    container = pod["containers"][0]
    assert {"name": "shm", "mountPath": "/dev/shm", "subPath": "shm"} in container["volumeMounts"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    cpu = pod_of(vllm_spec(engine={"device": "cpu"}, resources={"memory": "8Gi"}), conn)
    limits = cpu["containers"][0]["resources"]["limits"]
    assert limits == {"memory": "8Gi"}
    amd = vllm_spec(resources={"gpus": 1, "gpuResourceName": "amd.com/gpu"})
    assert pod_of(amd, conn)["containers"][0]["resources"]["limits"] == {"amd.com/gpu": "1"}


def test_a_deployment_named_vllm_gets_no_service_link_variables() -> None:
    """A Service "vllm" would give its pods VLLM_PORT=tcp://..., which vLLM dies on."""
    children = {o["kind"]: o for o in build_children("vllm", "ns", vllm_spec(), conn_of())}
    assert children["Service"]["metadata"]["name"] == "vllm"
    pod = children["Deployment"]["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False
    assert not [e for e in pod["containers"][0]["env"] if e["name"].startswith("VLLM_PORT")]
    # a crash leaves its last log lines in the pod status (ReplicaFailure quotes them)
    assert pod["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_stock_images_get_the_connector_from_the_cache_image() -> None:
    pod = pod_of(vllm_spec(), conn_of())
    init = {c["name"]: c for c in pod["initContainers"]}
    install = init["install-connector"]
    assert install["image"] == "reg/node:t1"
    # a cluster of default images: the copy comes from the (smaller) CPU variant, even on GPUs
    gpu_cluster = CacheConnection.from_cluster("c", LMCacheClusterSpec(), namespace="ns")
    assert gpu_cluster.image == "ghcr.io/lmcache-k8s/lmcache-node:0.1.0-cpu"
    assert gpu_cluster.device == "cuda"
    assert install["command"][:2] == ["python3", "-c"]
    assert install["command"][-1] == "/opt/lmcache-connector"
    assert {"name": "lmcache-connector", "emptyDir": {}} in pod["volumes"]
    assert env_of(pod["containers"][0])["PYTHONPATH"] == "/opt/lmcache-connector"
    for ready_made in (
        vllm_spec(image={"includesConnector": True}),
        vllm_spec(engine={"device": "cpu"}),
    ):
        pod = pod_of(ready_made, conn_of())
        assert [c["name"] for c in pod["initContainers"]] == ["wait-for-cache"]
        assert "PYTHONPATH" not in env_of(pod["containers"][0])
        assert all(v["name"] != "lmcache-connector" for v in pod["volumes"])


def test_required_colocation_gates_and_selects_the_clusters_nodes() -> None:
    conn = conn_of(placement={"nodeSelector": {"pool": "a"}})
    pod = pod_of(vllm_spec(placement={"nodeSelector": {"zone": "z1"}}), conn)
    assert pod["nodeSelector"] == {"pool": "a", "zone": "z1"}
    assert pod["schedulingGates"] == [{"name": SCHEDULING_GATE}]
    term = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["labelSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "lmcache-node",
        "lmcache.dev/cluster": "c",
    }
    assert term["topologyKey"] == "kubernetes.io/hostname"
    wait = next(c for c in pod["initContainers"] if c["name"] == "wait-for-cache")
    assert wait["command"][-1] == "http://$(HOST_IP):8080/readyz"


def test_preferred_and_no_colocation() -> None:
    conn = conn_of(placement={"nodeSelector": {"pool": "a"}})
    pod = pod_of(vllm_spec(placement={"colocateWithCache": "Preferred"}), conn)
    assert "schedulingGates" not in pod and "nodeSelector" not in pod
    preferred = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0]["preference"]["matchExpressions"] == [
        {"key": "pool", "operator": "In", "values": ["a"]}
    ]
    assert "preferredDuringSchedulingIgnoredDuringExecution" in pod["affinity"]["podAffinity"]
    assert [c["name"] for c in pod["initContainers"]] == ["install-connector"]
    free = pod_of(vllm_spec(placement={"colocateWithCache": "None"}), conn)
    assert "affinity" not in free and "schedulingGates" not in free


def test_cache_disabled_gives_plain_vllm() -> None:
    pod = pod_of(vllm_spec(cache={"enabled": False}), None)
    container = pod["containers"][0]
    assert "--kv-transfer-config" not in container["args"]
    assert "initContainers" not in pod and "schedulingGates" not in pod
    assert [e["name"] for e in container["env"]] == ["HOST_IP", "PYTHONHASHSEED"]


def test_connection_changes_roll_the_pods_and_cache_size_does_not() -> None:
    def template(**cluster: Any) -> dict[str, Any]:
        deployment = objects(vllm_spec(), conn_of(**cluster))["Deployment"]
        tpl: dict[str, Any] = deployment["spec"]["template"]
        return tpl

    base = template()
    assert CONFIG_HASH_ANNOTATION in base["metadata"]["annotations"]
    assert template(cache={"cpuSize": "64Gi"}) == base
    for change in (
        {"server": {"port": 6001}},
        {"server": {"port": 6000, "chunkSize": 512}},
        {"server": {"port": 6000, "transferMode": "engine"}},
    ):
        changed = template(**change)
        assert (
            changed["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
            != base["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        ), change


def test_engine_arguments_and_service() -> None:
    spec = vllm_spec(
        model={
            "name": "/models/m",
            "servedModelName": "m",
            "volume": {"source": {"hostPath": {"path": "/models/w"}}},
        },
        engine={
            "maxModelLen": 4096,
            "enablePrefixCaching": False,
            "gpuMemoryUtilization": 0.8,
            "extraArgs": ["--seed", "1"],
        },
        service={"type": "NodePort", "port": 9000},
        replicas=3,
    )
    objs = objects(spec, conn_of())
    deployment = objs["Deployment"]
    assert deployment["spec"]["replicas"] == 3
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    for flag, value in [
        ("--port", "9000"),
        ("--served-model-name", "m"),
        ("--max-model-len", "4096"),
        ("--gpu-memory-utilization", "0.8"),
    ]:
        assert args[args.index(flag) + 1] == value
    assert "--no-enable-prefix-caching" in args and args[-2:] == ["--seed", "1"]
    model_mount = {"name": "model", "mountPath": "/models", "readOnly": True, "subPath": "w"}
    assert model_mount in container["volumeMounts"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    service = objs["Service"]
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"][0]["port"] == 9000
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize(
    ("spec_fields", "cluster_fields", "fragment"),
    [
        (
            {"engine": {"extraArgs": ["--block-size", "48"]}},
            {},
            "not a multiple of vLLM's block size 48",
        ),
        ({"engine": {"device": "cpu"}}, {"server": {"chunkSize": 64}}, "block size 128 on cpu"),
        ({"engine": {"device": "cpu"}}, {"device": "cuda"}, "transferMode shared"),
        ({}, {"hostNetwork": False}, "without hostNetwork"),
    ],
)
def test_incompatible_clusters_are_explained(
    spec_fields: dict[str, Any], cluster_fields: dict[str, Any], fragment: str
) -> None:
    problems = compatibility_problems(vllm_spec(**spec_fields), conn_of(**cluster_fields))
    assert any(fragment in p for p in problems), problems


def test_compatible_pairs_have_no_problems() -> None:
    assert compatibility_problems(vllm_spec(), conn_of()) == []
    cpu = vllm_spec(engine={"device": "cpu", "extraArgs": ["--block-size=64"]})
    assert compatibility_problems(cpu, conn_of(device="cpu")) == []
    engine_mode = conn_of(device="cuda", server={"transferMode": "engine"})
    assert compatibility_problems(vllm_spec(engine={"device": "cpu"}), engine_mode) == []


# ---- the init containers' scripts, run for real ----------------------------------------------


@pytest.mark.integration
def test_install_script_copies_an_importable_package(tmp_path: Path) -> None:
    target = tmp_path / "connector"
    target.mkdir()
    subprocess.run([sys.executable, "-c", INSTALL_SCRIPT, str(target)], check=True, timeout=60)
    assert (target / "lmcache_node" / "vllm" / "connector.py").is_file()
    assert not list(target.rglob("__pycache__"))
    code = "import lmcache_node.vllm.settings as s; print(s.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
    ).stdout
    assert out.strip().startswith(str(target))


@pytest.fixture
def flaky_readyz() -> Iterator[tuple[str, list[int]]]:
    """A loopback /readyz that answers 503 twice, then 200."""
    answers = [503, 503]
    seen: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = answers.pop(0) if answers else 200
            seen.append(code)
            self.send_response(code)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/readyz", seen
    finally:
        server.shutdown()


@pytest.mark.integration
def test_wait_script_waits_for_a_ready_server(flaky_readyz: tuple[str, list[int]]) -> None:
    url, seen = flaky_readyz
    result = subprocess.run(
        [sys.executable, "-c", WAIT_SCRIPT, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert seen == [503, 503, 200]
    assert "waiting for the node's cache server" in result.stdout
    assert f"cache server ready at {url}" in result.stdout


# ---- render and examples ---------------------------------------------------------------------


def _lmcache_docs(*names: str) -> str:
    docs = []
    for name in names:
        for doc in yaml.safe_load_all((EXAMPLES / name).read_text()):
            if doc and doc["apiVersion"].startswith("lmcache.dev/"):
                docs.append(doc)
    return yaml.safe_dump_all(docs)


@pytest.mark.parametrize(
    "files",
    [
        ("lmcachecluster.yaml", "vllmdeployment.yaml"),
        ("lmcachecluster-cpu.yaml", "vllmdeployment-cpu.yaml"),
        ("vllmdeployment-disaggregated.yaml",),
    ],
    ids=lambda f: f[-1],
)
def test_examples_render(
    files: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "in.yaml"
    path.write_text(_lmcache_docs(*files))
    assert cli_main(["render", "-f", str(path)]) == 0
    rendered = list(yaml.safe_load_all(capsys.readouterr().out))
    deployments = [o for o in rendered if o["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert "--kv-transfer-config" in container["args"]


def test_disaggregated_example_pairs_a_producer_and_a_consumer() -> None:
    docs = list(yaml.safe_load_all((EXAMPLES / "vllmdeployment-disaggregated.yaml").read_text()))
    roles = {
        d["metadata"]["name"]: d["spec"]["cache"]["kvRole"]
        for d in docs
        if d["kind"] == "VLLMDeployment"
    }
    assert sorted(roles.values()) == ["kv_consumer", "kv_producer"]
    proxy = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["proxy.py"]
    compile(proxy, "proxy.py", "exec")  # the proxy is valid Python
    env = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    urls = {e["name"]: e["value"] for e in env["containers"][0]["env"]}
    assert urls == {"PREFILL_URL": "http://pd-prefill:8000", "DECODE_URL": "http://pd-decode:8000"}
    assert {roles["pd-prefill"], roles["pd-decode"]} == {"kv_producer", "kv_consumer"}
    assert roles["pd-prefill"] == "kv_producer"


def test_render_needs_the_referenced_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "in.yaml"
    path.write_text((EXAMPLES / "vllmdeployment.yaml").read_text())
    assert cli_main(["render", "-f", str(path)]) == 1
    assert "cache.clusterRef 'main' names no LMCacheCluster" in capsys.readouterr().err


VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm (scripts/vllm-venv.sh)")
def test_copied_package_loads_the_connector_under_real_vllm(tmp_path: Path) -> None:
    """What the init container gives a vLLM image: the connector class from the copy."""
    target = tmp_path / "connector"
    target.mkdir()
    subprocess.run([sys.executable, "-c", INSTALL_SCRIPT, str(target)], check=True, timeout=60)
    code = (
        "import lmcache_node, lmcache_node.vllm.connector as c; "
        "print(lmcache_node.__file__); print(c.LMCacheNodeConnector.__mro__[1].__name__)"
    )
    out = subprocess.run(
        [str(VLLM_PYTHON), "-c", code],
        check=True,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target), "VLLM_TARGET_DEVICE": "cpu"},
    ).stdout.split()
    assert out[-2].startswith(str(target))
    assert out[-1] == "KVConnectorBase_V1"


# ---- guard rails: security contexts, shm group, refused pass-through --------------------------


def test_vllm_pods_drop_every_capability_and_join_the_clusters_shm_group() -> None:
    from lmcache_operator.builders.lmcachecluster import build_children as cluster_children

    cluster = LMCacheClusterSpec.model_validate(CLUSTER)
    conn = CacheConnection.from_cluster("c", cluster, namespace="ns")
    pod = pod_of(vllm_spec(), conn)  # the stock GPU image: root, so no runAsNonRoot
    assert pod["securityContext"] == {
        "seccompProfile": {"type": "RuntimeDefault"},
        "supplementalGroups": [cluster.group("ns", "c")],
        "fsGroup": cluster.group("ns", "c"),  # a non-root vLLM reads the 0440 client keys
    }
    assert pod["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    # the very group the cache pods of LMCacheCluster ns/c run with
    daemonset = next(
        o for o in cluster_children("c", "ns", cluster, service_monitor=False)
        if o["kind"] == "DaemonSet"
    )  # fmt: skip
    cache_groups = daemonset["spec"]["template"]["spec"]["securityContext"]["supplementalGroups"]
    assert cache_groups == pod["securityContext"]["supplementalGroups"]
    for init in pod["initContainers"]:  # from the cache image: its non-root user, no privileges
        context = init["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == 65532
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["allowPrivilegeEscalation"] is False


def test_our_cpu_image_runs_non_root_and_stock_images_opt_in() -> None:
    cpu = pod_of(vllm_spec(engine={"device": "cpu"}), conn_of(device="cpu"))
    assert cpu["securityContext"]["runAsNonRoot"] is True
    opted = vllm_spec(pod={"securityContext": {"runAsNonRoot": True, "runAsUser": 1000}})
    context = pod_of(opted, conn_of())["securityContext"]
    assert (context["runAsNonRoot"], context["runAsUser"]) == (True, 1000)
    assert "runAsNonRoot" not in pod_of(vllm_spec(), conn_of())["securityContext"]


def test_without_a_namespace_the_connection_knows_only_an_explicit_group() -> None:
    spec = LMCacheClusterSpec.model_validate(CLUSTER)
    assert CacheConnection.from_cluster("c", spec).shm_group is None
    assert (
        "supplementalGroups"
        not in pod_of(vllm_spec(), CacheConnection.from_cluster("c", spec))["securityContext"]
    )
    explicit = LMCacheClusterSpec.model_validate(CLUSTER | {"shmGroup": 4242})
    assert CacheConnection.from_cluster("c", explicit).shm_group == 4242


def test_shm_group_change_rolls_the_vllm_pods() -> None:
    spec = vllm_spec()
    before = objects(spec, conn_of())["Deployment"]["spec"]["template"]
    after = objects(spec, conn_of(shmGroup=4242))["Deployment"]["spec"]["template"]
    assert (
        before["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        != after["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    )


ADMIN_FIX = "allowPrivilegedPassThrough: true"


@pytest.mark.parametrize(
    ("fields", "fragment", "fix"),
    [
        ({"pod": {"containerSecurityContext": {"privileged": True}}}, "privileged", ADMIN_FIX),
        (
            {"pod": {"containerSecurityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}},
            "capabilities.add",
            ADMIN_FIX,
        ),
        (
            {"pod": {"containerSecurityContext": {"allowPrivilegeEscalation": True}}},
            "allowPrivilegeEscalation",
            ADMIN_FIX,
        ),
        (
            {"pod": {"securityContext": {"sysctls": [{"name": "a", "value": "1"}]}}},
            "sysctls",
            ADMIN_FIX,
        ),
        (
            {"pod": {"securityContext": {"seccompProfile": {"type": "Unconfined"}}}},
            "seccompProfile",
            ADMIN_FIX,
        ),
        (
            {"pod": {"securityContext": {"supplementalGroups": [1879048192]}}},
            "reserved",
            "remove it",
        ),
        (
            {"pod": {"volumes": [{"name": "r", "hostPath": {"path": "/"}}]}},
            "spec.pod.volumes[0].hostPath.path: '/' must not be / or a system directory",
            ADMIN_FIX,
        ),
        (
            {"model": {"name": "m", "volume": {"source": {"hostPath": {"path": "/opt/m"}}}}},
            "spec.model.volume.source.hostPath.path: '/opt/m' is not under an allowed",
            ADMIN_FIX,
        ),
    ],
)
def test_privileged_pass_through_is_refused_naming_the_field(
    fields: dict[str, Any], fragment: str, fix: str
) -> None:
    spec = vllm_spec(**fields)
    problems = spec.semantic_problems()
    assert len(problems) == 1 and fragment in problems[0], problems
    assert fix in problems[0]
    trusted = PodPolicy(allow_privileged_pass_through=True)
    assert spec.semantic_problems(trusted) == []
    build_children("llm", "ns", spec, conn_of(), trusted)  # and the builders take it as written


def test_topology_spread_and_env_from_pass_through() -> None:
    spread = {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}
    spec = vllm_spec(
        placement={"topologySpreadConstraints": [spread]},
        pod={"envFrom": [{"secretRef": {"name": "keys"}}]},
    )
    pod = pod_of(spec, conn_of())
    assert pod["topologySpreadConstraints"] == [spread]
    assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "keys"}}]
