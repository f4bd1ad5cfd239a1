"""Pure builders: the objects an LMCacheCluster spec turns into."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from lmcache_node.config import load_config
from lmcache_node.engine.journal import PoolGeometry
from lmcache_node.keys import HASH_ALGORITHM
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.api.policy import PodPolicy
from lmcache_operator.builders.cache_memory import container_resources, pool_bytes
from lmcache_operator.builders.cache_rollout import TEMPLATE_HASH_ANNOTATION, operator_rolls
from lmcache_operator.builders.cache_security import server_uid
from lmcache_operator.builders.common import CONFIG_HASH_ANNOTATION, content_hash
from lmcache_operator.builders.lmcachecluster import (
    CONFIG_KEY,
    build_children,
    build_configmap,
    node_config,
)
from lmcache_operator.quantity import parse_bytes


def spec_of(**fields: Any) -> LMCacheClusterSpec:
    return LMCacheClusterSpec.model_validate(fields)


def children(spec: LMCacheClusterSpec, monitor: bool = False) -> dict[str, dict[str, Any]]:
    objs = build_children("c1", "ns", spec, service_monitor=monitor)
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


def daemonset(spec: LMCacheClusterSpec) -> dict[str, Any]:
    return children(spec)["DaemonSet/c1-cache"]


def test_node_config_uses_the_node_keys_and_units() -> None:
    spec = spec_of(
        server={"port": 6000, "httpPort": 9000, "chunkSize": 512, "maxWorkers": 4},
        cache={
            "cpuSize": "1536Mi",
            "disk": {"path": "/mnt/cache", "size": "20Gi"},
            "remote": {"url": "redis://redis:6379/0", "serde": "zstd"},
        },
        device="cpu",
    )
    config = node_config("c1", "ns", spec)
    assert config["chunk_size"] == 512
    assert config["max_local_cpu_size"] == 1.5  # GB float, never a quantity string
    assert config["local_disk"] == "file:///lmcache/disk/"  # a path URL (the mount), never True
    assert config["max_local_disk_size"] == 20.0
    assert config["remote_url"] == "redis://redis:6379/0"
    assert config["remote_serde"] == "zstd"
    assert (config["port"], config["http_port"], config["max_workers"]) == (6000, 9000, 4)
    assert config["host"] == "0.0.0.0"
    assert config["device"] == "cpu"


@pytest.mark.parametrize(
    ("fields", "device"),
    [
        ({}, "cuda"),  # auto on GPU nodes
        ({"placement": {"nodeSelector": {"pool": "cache"}}}, "cpu"),  # auto elsewhere
        ({"device": "cpu"}, "cpu"),
        ({"device": "cuda", "server": {"transferMode": "engine"}}, "cpu"),
    ],
)
def test_device_resolution(fields: dict[str, Any], device: str) -> None:
    assert node_config("c1", "ns", spec_of(**fields))["device"] == device


def test_the_node_accepts_the_rendered_config_file(tmp_path: Path) -> None:
    spec = spec_of(
        cache={
            "cpuSize": "2Gi",
            "disk": {"path": str(tmp_path / "l2"), "size": "1Gi"},
            "remote": {"url": "redis://127.0.0.1:6379/0", "serde": "lz4"},
        },
        server={"logLevel": "DEBUG"},
    )
    path = tmp_path / "config.yaml"
    path.write_text(build_configmap("c1", "ns", spec)["data"][CONFIG_KEY])
    config = load_config(config_file=path, environ={})
    assert config.max_local_cpu_size == 2.0
    assert config.disk_path == Path("/lmcache/disk")  # the cluster's directory, mounted
    assert config.max_local_disk_size == 1.0
    assert str(config.shm_dir) == "/dev/shm/lmcache-ns.c1"
    assert config.shm_group == spec.group("ns", "c1")
    assert config.remote_url == "redis://127.0.0.1:6379/0"
    # the credentials the operator mounts (docs/security.md)
    assert config.curve_server_key == "/var/run/lmcache/credentials/server.key"
    assert config.curve_client_keys == "/var/run/lmcache/keys/clients.pub"
    assert config.http_token_file == "/var/run/lmcache/credentials/http.token"
    assert config.remote_secret_file == "/var/run/lmcache/credentials/remote.key"
    assert config.remote_key_prefix == "ns/c1"
    assert not config.insecure_allow_unauthenticated
    assert config.remote_serde == "lz4"
    assert config.log_level == "DEBUG"
    assert config.device == "cuda"


def test_daemonset_pod_wiring() -> None:
    ds = daemonset(spec_of())
    pod = ds["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm == {"name": "shm", "hostPath": {"path": "/dev/shm", "type": "Directory"}}
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert [m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"] == [
        "shm"
    ]  # never an emptyDir over the host's tmpfs
    assert container["command"][:4] == [
        "lmcache-node",
        "serve",
        "--config",
        "/etc/lmcache/config.yaml",
    ]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    # no LMCACHE_*_PORT variables from Services named lmcache-...; errors reach the status
    assert pod["enableServiceLinks"] is False
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    for kind in ("requests", "limits"):
        assert not any("nvidia.com" in r for r in container["resources"][kind])
    env = {e["name"]: e for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"  # CUDA IPC on the default GPU nodes
    # the operator rolls the pods itself, node by node (controllers/rollout.py)
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert operator_rolls(spec_of())
    assert not operator_rolls(spec_of(updateStrategy={"type": "OnDelete"}))
    # each pod says which template it was made from
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    template = copy.deepcopy(ds["spec"]["template"])
    del template["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]
    assert annotations[TEMPLATE_HASH_ANNOTATION] == content_hash(template)


def test_daemonset_without_host_network_and_with_escape_hatches() -> None:
    spec = spec_of(
        hostNetwork=False,
        updateStrategy={"maxSurge": 1, "maxUnavailable": 0},
        placement={
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "priorityClassName": "system-node-critical",
            "runtimeClassName": "nvidia",
        },
        pod={
            "labels": {"team": "a"},
            "annotations": {"note": "x"},
            "env": [{"name": "EXTRA", "value": "1"}],
            "volumes": [{"name": "extra", "emptyDir": {}}],
            "volumeMounts": [{"name": "extra", "mountPath": "/extra"}],
            "securityContext": {"runAsUser": 1000},
        },
        image={"pullSecrets": ["regcred"]},
    )
    ds = daemonset(spec)
    template = ds["spec"]["template"]
    pod = template["spec"]
    assert pod["hostNetwork"] is False and pod["dnsPolicy"] == "ClusterFirst"
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["securityContext"]["runAsUser"] == 1000  # merged over the defaults
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert template["metadata"]["labels"]["team"] == "a"
    assert template["metadata"]["annotations"]["note"] == "x"
    container = pod["containers"][0]
    assert {"name": "EXTRA", "value": "1"} in container["env"]
    assert {"name": "extra", "mountPath": "/extra"} in container["volumeMounts"]
    # maxSurge (no host network): the DaemonSet controller rolls, not the operator
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert not operator_rolls(spec)


def test_memory_is_derived_from_the_cache_size() -> None:
    spec = spec_of(cache={"cpuSize": "8Gi"})
    # the pool file the node server makes (its own geometry): 8 GiB of pages + the index
    for size in ("8Gi", "1536Mi", "100Gi", "3G"):
        cpu = parse_bytes(size)
        geometry = PoolGeometry(2**20, cpu // 2**20, 256, HASH_ALGORITHM)
        assert pool_bytes(spec_of(cache={"cpuSize": size})) == geometry.total_bytes, size
    assert pool_bytes(spec) == 8 * 2**30 + 2 * 2**20
    resources = container_resources(spec)
    assert resources["requests"]["memory"] == "10242Mi"  # the pool + 2 Gi
    assert resources["limits"]["memory"] == "12803Mi"  # 25 % above the request (whole MiB)


def test_memory_override_wins() -> None:
    resources = container_resources(spec_of(resources={"requests": {"memory": "12Gi", "cpu": "2"}}))
    assert resources["requests"] == {"memory": "12Gi", "cpu": "2"}
    assert resources["limits"]["memory"] == "15360Mi"


def test_config_change_changes_the_pod_template_hash() -> None:
    def config_hash(spec: LMCacheClusterSpec) -> str:
        return str(
            daemonset(spec)["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        )

    base = config_hash(spec_of())
    assert config_hash(spec_of()) == base
    assert config_hash(spec_of(cache={"cpuSize": "6Gi"})) != base
    assert config_hash(spec_of(server={"chunkSize": 128})) != base
    secret = {"remote": {"urlSecretRef": {"name": "r", "key": "url"}}}
    assert config_hash(spec_of(cache=secret)) != base


def test_remote_url_from_a_secret_is_an_env_reference_not_config() -> None:
    spec = spec_of(cache={"remote": {"urlSecretRef": {"name": "redis", "key": "url"}}})
    assert "remote_url" not in node_config("c1", "ns", spec)
    env = daemonset(spec)["spec"]["template"]["spec"]["containers"][0]["env"]
    remote = next(e for e in env if e["name"] == "LMCACHE_REMOTE_URL")
    assert remote["valueFrom"] == {"secretKeyRef": {"name": "redis", "key": "url"}}


def test_services() -> None:
    objs = children(spec_of(server={"port": 7000, "httpPort": 7001}))
    local = objs["Service/c1-cache"]["spec"]
    assert local["internalTrafficPolicy"] == "Local"
    assert [(p["name"], p["port"]) for p in local["ports"]] == [("zmq", 7000), ("http", 7001)]
    metrics = objs["Service/c1-cache-metrics"]
    assert metrics["spec"]["clusterIP"] == "None"
    assert metrics["spec"]["ports"][0]["port"] == 7001
    ds = objs["DaemonSet/c1-cache"]
    assert local["selector"] == ds["spec"]["selector"]["matchLabels"]
    assert metrics["spec"]["selector"] == ds["spec"]["selector"]["matchLabels"]


def test_service_monitor_only_when_wanted_and_available() -> None:
    wanted = spec_of(monitoring={"serviceMonitor": True, "interval": "15s", "labels": {"r": "p"}})
    assert "ServiceMonitor/c1-cache" not in children(spec_of(), monitor=True)
    assert "ServiceMonitor/c1-cache" not in children(wanted, monitor=False)
    objs = children(wanted, monitor=True)
    monitor = objs["ServiceMonitor/c1-cache"]
    assert monitor["metadata"]["labels"]["r"] == "p"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    metrics_labels = objs["Service/c1-cache-metrics"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics_labels.items()


def test_configmap_holds_yaml_the_node_reads() -> None:
    cm = build_configmap("c1", "ns", spec_of())
    assert cm["metadata"]["name"] == "c1-cache-config"
    assert yaml.safe_load(cm["data"][CONFIG_KEY])["chunk_size"] == 256


def test_disk_tier_init_hands_only_the_clusters_own_directory_to_the_server() -> None:
    pod = daemonset(spec_of(cache={"cpuSize": "1Gi", "disk": {"path": "/mnt/l2", "size": "5Gi"}}))[
        "spec"
    ]["template"]["spec"]
    (init,) = pod["initContainers"]
    main = pod["containers"][0]
    assert init["image"] == main["image"]
    group = spec_of().group("ns", "c1")
    assert init["args"] == [str(server_uid("ns", "c1")), str(group), "/lmcache/disk"]
    script = init["command"][2]
    assert '[ -L "$d" ]' in script and 'chown -h "$0:$1" "$d"' in script  # no symlink followed
    assert "-R" not in script  # never recursive
    context = init["securityContext"]
    assert context["runAsUser"] == 0 and context["runAsNonRoot"] is False
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    assert context["allowPrivilegeEscalation"] is False
    # the host volume is the allowed prefix; the cluster's directory a subPath below it, which
    # kubelet resolves inside the volume (a planted symlink cannot leave /mnt)
    disk_volume = next(v for v in pod["volumes"] if v["name"] == "disk")
    assert disk_volume["hostPath"] == {"path": "/mnt", "type": "DirectoryOrCreate"}
    mount = {"name": "disk", "mountPath": "/lmcache/disk", "subPath": "l2/lmcache-ns.c1"}
    assert init["volumeMounts"] == [mount]
    assert mount in main["volumeMounts"]


def test_disk_path_equal_to_a_prefix_still_gets_a_directory_of_its_own() -> None:
    pod = daemonset(spec_of(cache={"disk": {"path": "/var/cache/lmcache", "size": "5Gi"}}))["spec"][
        "template"
    ]["spec"]
    disk_volume = next(v for v in pod["volumes"] if v["name"] == "disk")
    assert disk_volume["hostPath"]["path"] == "/var/cache/lmcache"
    (mount,) = pod["initContainers"][0]["volumeMounts"]
    assert mount["subPath"] == "lmcache-ns.c1"  # /var/cache/lmcache itself is never chowned


def test_disk_init_container_follows_the_servers_security_context() -> None:
    spec = spec_of(
        cache={"cpuSize": "1Gi", "disk": {"path": "/mnt/l2", "size": "5Gi"}},
        pod={
            "securityContext": {"runAsUser": 1000, "runAsGroup": 2000},
            "containerSecurityContext": {"runAsUser": 1234},
        },
    )
    pod = daemonset(spec)["spec"]["template"]["spec"]
    main = pod["containers"][0]
    uid = main["securityContext"]["runAsUser"]
    assert pod["initContainers"][0]["args"][:2] == [str(uid), "2000"]
    assert uid == 1234


def test_no_init_container_without_a_disk_tier() -> None:
    pod = daemonset(spec_of(cache={"cpuSize": "1Gi"}))["spec"]["template"]["spec"]
    assert "initContainers" not in pod


def test_cache_pods_run_non_root_without_privileges_on_a_read_only_root() -> None:
    pod = daemonset(spec_of())["spec"]["template"]["spec"]
    group = spec_of().group("ns", "c1")
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": server_uid("ns", "c1"),  # the cluster's own user, not the image's
        "runAsGroup": group,
        "fsGroup": group,  # the 0440 credential files are readable through it
        "supplementalGroups": [group],
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }
    # the server writes only to its volumes: /dev/shm, the disk tier and /tmp (HOME)
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert tmp == {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_user_security_context_merges_over_the_defaults_and_keeps_drop_all() -> None:
    spec = spec_of(
        pod={
            "securityContext": {"supplementalGroups": [3000], "fsGroup": 3000},
            "containerSecurityContext": {
                "capabilities": {"drop": ["NET_RAW"]},
                "readOnlyRootFilesystem": False,
            },
        }
    )
    pod = daemonset(spec)["spec"]["template"]["spec"]
    assert pod["securityContext"]["supplementalGroups"] == [spec.group("ns", "c1"), 3000]
    assert pod["securityContext"]["fsGroup"] == 3000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = pod["containers"][0]["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL", "NET_RAW"]}
    assert context["readOnlyRootFilesystem"] is False
    assert context["allowPrivilegeEscalation"] is False


def test_shm_dir_and_group_are_the_clusters_own() -> None:
    config = node_config("c1", "ns", spec_of())
    assert config["shm_dir"] == "/dev/shm/lmcache-ns.c1"
    group = config["shm_group"]
    assert 1879048192 <= group <= 2147483646
    assert group == node_config("c1", "ns", spec_of())["shm_group"]  # deterministic
    others = {node_config(n, ns, spec_of())["shm_group"] for n in ("c1", "c2") for ns in "ab"}
    assert len(others) == 4 and group not in others
    assert node_config("c1", "ns", spec_of(shmGroup=4242))["shm_group"] == 4242


def test_pass_through_host_paths_are_confined_to_their_prefix() -> None:
    spec = spec_of(
        pod={
            "volumes": [
                {"name": "data", "hostPath": {"path": "/mnt/data/set", "type": "Directory"}},
                {"name": "scratch", "emptyDir": {}},
            ],
            "volumeMounts": [
                {"name": "data", "mountPath": "/data", "subPath": "a", "readOnly": True},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
        }
    )
    pod = daemonset(spec)["spec"]["template"]["spec"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data["hostPath"] == {"path": "/mnt", "type": "DirectoryOrCreate"}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["data"] == {
        "name": "data",
        "mountPath": "/data",
        "subPath": "data/set/a",
        "readOnly": True,
    }
    assert "subPath" not in mounts["scratch"]


def test_builders_refuse_a_host_path_outside_the_policy() -> None:
    spec = spec_of(cache={"disk": {"path": "/opt/cache", "size": "1Gi"}})
    assert spec.semantic_problems()  # validation says why ...
    with pytest.raises(ValueError, match="outside the allowed prefixes"):  # ... builders refuse
        daemonset(spec)
    allowed = PodPolicy(("/opt", "/dev/shm"))
    assert spec.semantic_problems(allowed) == []
    objs = build_children("c1", "ns", spec, service_monitor=False, policy=allowed)
    pod = next(o for o in objs if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "disk")["hostPath"]["path"] == "/opt"


def test_env_from_reaches_the_server_container() -> None:
    spec = spec_of(pod={"envFrom": [{"configMapRef": {"name": "extra"}}]})
    container = daemonset(spec)["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"configMapRef": {"name": "extra"}}]


# ----- the node image per device (the CUDA variant and the nvidia RuntimeClass on GPUs) -----
def _pod_and_container(spec: LMCacheClusterSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = daemonset(spec)["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_gpu_placement_runs_the_cuda_image_with_the_nvidia_runtime_class() -> None:
    pod, container = _pod_and_container(spec_of())  # device auto, GPU nodes: the defaults
    assert container["image"] == "ghcr.io/lmcache-k8s/lmcache-node:0.1.0-cuda"
    assert pod["runtimeClassName"] == "nvidia"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert not any("nvidia.com/gpu" in r for r in container["resources"]["limits"])


def test_cpu_device_runs_the_cpu_image_without_runtime_class_or_gpu_env() -> None:
    for spec in (spec_of(device="cpu"), spec_of(placement={"nodeSelector": {"pool": "cpu"}})):
        pod, container = _pod_and_container(spec)
        assert container["image"] == "ghcr.io/lmcache-k8s/lmcache-node:0.1.0-cpu"
        assert "runtimeClassName" not in pod
        assert not any(e["name"].startswith("NVIDIA_") for e in container["env"])


def test_engine_transfer_mode_serves_cpu_and_runs_the_cpu_image() -> None:
    _, container = _pod_and_container(spec_of(server={"transferMode": "engine"}))
    assert container["image"].endswith(":0.1.0-cpu")


def test_an_explicit_image_and_runtime_class_win_and_empty_omits_the_class() -> None:
    spec = spec_of(
        image={"repository": "registry.local/node", "tag": "custom"},
        placement={"runtimeClassName": "nvidia-cdi"},
    )
    pod, container = _pod_and_container(spec)
    assert container["image"] == "registry.local/node:custom"
    assert pod["runtimeClassName"] == "nvidia-cdi"
    pod, _ = _pod_and_container(spec_of(placement={"runtimeClassName": ""}))
    assert "runtimeClassName" not in pod


def test_the_operators_node_image_defaults_apply() -> None:
    from lmcache_operator.builders.node_image import NodeImageDefaults

    images = NodeImageDefaults(repository="mirror.local/lmcache-node", version="9.9.9",
                               cuda_runtime_class="")  # fmt: skip
    objs = build_children("c1", "ns", spec_of(), service_monitor=False, images=images)
    pod = next(o for o in objs if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "mirror.local/lmcache-node:9.9.9-cuda"
    assert "runtimeClassName" not in pod  # the chart set cudaRuntimeClassName: ""
    disk = spec_of(cache={"disk": {"path": "/var/cache/lmcache", "size": "1Gi"}})
    objs = build_children("c1", "ns", disk, service_monitor=False, images=images)
    init = next(o for o in objs if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert init["initContainers"][0]["image"] == "mirror.local/lmcache-node:9.9.9-cuda"


def test_the_default_example_renders_the_cuda_image_and_runtime_class() -> None:
    example = yaml.safe_load(
        (Path(__file__).parents[2] / "manifests/examples/lmcachecluster.yaml").read_text()
    )
    pod, container = _pod_and_container(LMCacheClusterSpec.model_validate(example["spec"]))
    assert container["image"].endswith("-cuda") and pod["runtimeClassName"] == "nvidia"
