"""The connection contract (builders/connection.py) and `lmcache-operator connection -f`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq
from lmcache_node.vllm.settings import env_name, load_settings
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.builders.cache_security import shm_dir
from lmcache_operator.builders.connection import (
    CLIENT_DIR,
    Connection,
    build_connection_configmap,
    env,
    kv_transfer_config,
    pod_template_patch,
    production_stack_values,
)
from lmcache_operator.builders.node_image import NodeImageDefaults
from lmcache_operator.connection_render import render_connection
from lmcache_operator.validation import RenderError

REPO = Path(__file__).resolve().parents[2]
CLUSTER = """
apiVersion: lmcache.dev/v1alpha1
kind: LMCacheCluster
metadata: {name: cache, namespace: ml}
spec:
  server: {port: 6000, httpPort: 6001, chunkSize: 512, transferMode: engine}
  image: {pullSecrets: [regcred]}
  placement: {nodeSelector: {pool: gpu}}
"""


def spec(text: str = CLUSTER) -> LMCacheClusterSpec:
    return LMCacheClusterSpec.model_validate(yaml.safe_load(text)["spec"])


def connection(text: str = CLUSTER) -> Connection:
    return Connection.from_cluster("cache", "ml", spec(text))


def test_settings_come_from_the_cluster_and_round_trip_through_the_configmap() -> None:
    conn = connection()
    assert (conn.port, conn.http_port, conn.chunk_size) == (6000, 6001, 512)
    assert conn.transfer_mode == "engine" and conn.device == "cpu"  # engine mode: server on cpu
    assert conn.shm_dir == shm_dir("ml", "cache")
    assert conn.shm_group == spec().group("ml", "cache")
    assert conn.client_secret == "cache-client-credentials"
    assert conn.node_selector == {"pool": "gpu"}
    assert conn.image_pull_secrets == ("regcred",)
    assert conn.connector_image.endswith("-cpu")  # the package is in either variant
    data = build_connection_configmap("cache", "ml", spec())["data"]
    assert Connection.from_data(data) == conn


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": "2"}, "contract version '2'"),
        ({"port": None}, "key 'port' is missing"),
        ({"port": "many"}, "malformed: invalid literal"),
        ({"nodeSelector": "{not json"}, "malformed"),
    ],
)
def test_a_bad_configmap_is_refused_naming_what_is_wrong(
    change: dict[str, str | None], message: str
) -> None:
    data: dict[str, Any] = dict(build_connection_configmap("cache", "ml", spec())["data"])
    for key, value in change.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    with pytest.raises(ValueError, match=message):
        Connection.from_data(data)


def test_configmap_holds_everything_a_pod_needs() -> None:
    configmap = build_connection_configmap("cache", "ml", spec())
    assert configmap["metadata"]["name"] == "cache-connection"
    assert configmap["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "lmcache-operator"
    data = configmap["data"]
    conn = connection()
    assert json.loads(data["kvTransferConfig"]) == kv_transfer_config()
    assert yaml.safe_load(data["env"]) == env(conn)
    assert yaml.safe_load(data["podTemplatePatch"]) == pod_template_patch(conn)
    assert data["clientSecret"] == "cache-client-credentials"
    assert data["credentialsDir"] == CLIENT_DIR
    assert data["shmHostPath"] == "/dev/shm"
    assert data["podLabel"] == "lmcache.dev/cluster=cache"
    assert all(isinstance(v, str) for v in data.values())  # a ConfigMap holds strings


def test_the_connectors_own_loader_reads_the_contract(tmp_path: Path) -> None:
    """The env and kv-transfer-config, as Kubernetes hands them to vLLM, configure our
    connector: the node's IP and port, the chunk size, the mode and the client keys."""
    public, secret = zmq.curve_keypair()
    server_public, _ = zmq.curve_keypair()
    (tmp_path / "client.key").write_bytes(secret + b"\n")
    (tmp_path / "client.pub").write_bytes(public + b"\n")
    (tmp_path / "server.pub").write_bytes(server_public + b"\n")
    conn = connection()
    environ = {"HOST_IP": "10.1.2.3"}
    for item in env(conn, install=False):
        if "value" in item:  # what the kubelet does with $(VAR) references
            environ[item["name"]] = item["value"].replace("$(HOST_IP)", environ["HOST_IP"])
    environ[env_name("credentials_dir")] = str(tmp_path)  # the Secret's mount, here
    assert {env_name(k) for k in ("host", "port", "chunk_size", "transfer_mode")} <= set(environ)
    extra = kv_transfer_config().get("kv_connector_extra_config")
    settings = load_settings(extra, environ)
    assert settings.url == "tcp://10.1.2.3:6000"
    assert settings.chunk_size == 512
    assert settings.transfer_mode == "engine"
    assert settings.client_credentials() is not None


def test_env_defines_host_ip_before_the_variables_that_use_it() -> None:
    names = [item["name"] for item in env(connection())]
    assert names[0] == "HOST_IP"
    assert names.index("LMCACHE_NODE_HOST") > names.index("HOST_IP")
    assert "PYTHONPATH" in names and "PYTHONPATH" not in [
        item["name"] for item in env(connection(), install=False)
    ]


def test_pod_template_patch_wires_a_container_by_name() -> None:
    patch = pod_template_patch(connection(), container="server", install=False)
    template = patch["spec"]["template"]
    assert template["metadata"]["labels"] == {"lmcache.dev/cluster": "cache"}
    pod = template["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "server"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/dev/shm", CLIENT_DIR}
    assert "initContainers" not in pod  # the image has the connector
    assert pod["nodeSelector"] == {"pool": "gpu"}
    group = spec().group("ml", "cache")
    assert pod["securityContext"] == {"supplementalGroups": [group], "fsGroup": group}
    secret = next(v for v in pod["volumes"] if "secret" in v)["secret"]
    assert secret == {"secretName": "cache-client-credentials", "defaultMode": 0o440}


def test_production_stack_values_fit_its_model_spec() -> None:
    text = production_stack_values(connection())
    assert text.startswith("# vLLM production-stack values")
    values = yaml.safe_load(text)
    (model,) = values["servingEngineSpec"]["modelSpec"]
    assert model["vllmConfig"]["extraArgs"][0] == "--kv-transfer-config"
    assert json.loads(model["vllmConfig"]["extraArgs"][1]) == kv_transfer_config()
    assert model["env"] == env(connection())
    assert model["nodeSelectorTerms"] == [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}
    ]
    assert model["initContainer"]["extraVolumeMounts"][0]["mountPath"] == "/opt/lmcache-connector"
    assert {m["name"] for m in model["extraVolumeMounts"]} == {
        v["name"] for v in model["extraVolumes"]
    }


# ---- lmcache-operator connection -f (offline) ----------------------------------------------


def test_offline_output_is_the_operators_configmap() -> None:
    text = render_connection(CLUSTER)
    (configmap,) = list(yaml.safe_load_all(text))
    assert configmap == build_connection_configmap("cache", "ml", spec())
    assert json.loads(render_connection(CLUSTER, "json")) == configmap


def test_offline_patch_and_values_and_namespace() -> None:
    no_namespace = CLUSTER.replace(", namespace: ml", "")
    patch = yaml.safe_load(render_connection(no_namespace, "patch", namespace="team"))
    group = spec().group("team", "cache")  # the shm group is derived from namespace/name
    assert patch["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == group
    values = render_connection(CLUSTER, "helm-values", install_connector=False)
    assert "initContainer" not in yaml.safe_load(values)["servingEngineSpec"]["modelSpec"][0]
    images = NodeImageDefaults(repository="registry.local/node", version="9.9")
    patch = yaml.safe_load(render_connection(CLUSTER, "patch", images=images))
    init = patch["spec"]["template"]["spec"]["initContainers"][0]
    assert init["image"] == "registry.local/node:9.9-cpu"


@pytest.mark.parametrize(
    ("text", "output", "message"),
    [
        ("kind: ConfigMap\napiVersion: v1\nmetadata: {name: x}\n", "yaml", "no LMCacheCluster"),
        (CLUSTER + "---\n" + CLUSTER.replace("name: cache", "name: other"), "patch", "takes one"),
        (CLUSTER.replace("chunkSize: 512", "chunkSize: -1"), "yaml", "spec.server.chunkSize"),
        (CLUSTER, "toml", "use one of"),
        ("{", "yaml", "not valid YAML"),
    ],
)
def test_offline_errors_say_what_is_wrong(text: str, output: str, message: str) -> None:
    with pytest.raises(RenderError, match=message):
        render_connection(text, output)


def test_cli_prints_the_contract_and_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    run = [sys.executable, "-m", "lmcache_operator.cli", "connection", "-f", str(path)]
    result = subprocess.run([*run, "-o", "patch"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["spec"]["template"]["spec"]["containers"][0]["name"] == (
        "vllm"
    )
    example = REPO / "manifests" / "examples" / "lmcachecluster-cpu.yaml"
    result = subprocess.run(
        [*run[:-1], str(example), "-o", "yaml"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["kind"] == "ConfigMap"
    path.write_text(CLUSTER.replace("port: 6000", "port: 0"))
    result = subprocess.run(run, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "spec.server.port" in result.stderr
