"""Pure pieces of the credentials: objects, mounts, env, names, ids, status and rollouts."""

from __future__ import annotations

from typing import Any

import pytest
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.api.policy import RESERVED_ID_MAX, RESERVED_ID_MIN
from lmcache_operator.api.vllmdeployment import VLLMDeploymentSpec
from lmcache_operator.builders.cache_security import IMAGE_UID, cluster_directory, server_uid
from lmcache_operator.builders.common import CONFIG_HASH_ANNOTATION
from lmcache_operator.builders.credentials import (
    ACTIVE,
    COMPLETED,
    RETIRING,
    ROLLING,
    AllowedKey,
    ClientKey,
    ClientMaterial,
    KeyState,
    PublicKeys,
    Rotation,
    ServerMaterial,
    build_cache_secret,
    build_client_secret,
    clients_pub_text,
    public_keys_from_status,
)
from lmcache_operator.builders.lmcachecluster import build_children, node_config
from lmcache_operator.builders.vllm_connector import CacheConnection
from lmcache_operator.builders.vllmdeployment import build_deployment, template_hash
from lmcache_operator.controllers.consumers import pods_on_old_key, rollout_problem
from lmcache_operator.controllers.lmcachecluster import removals

SERVER = "S" * 39 + "1"
OLD, NEW = "A" * 39 + "1", "B" * 39 + "2"


def keys(server: str = SERVER, *allowed: str, consumer: str = "") -> PublicKeys:
    chosen = allowed or (OLD,)
    return PublicKeys(
        server, tuple(AllowedKey(k, "active-t") for k in chosen), consumer or chosen[-1][:8]
    )


def cluster_objects(spec: dict[str, Any], pub: PublicKeys | None) -> dict[str, dict[str, Any]]:
    model = LMCacheClusterSpec.model_validate(spec)
    objs = build_children("c1", "ns", model, service_monitor=False, keys=pub)
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# ---- cache pods ----------------------------------------------------------------------------


def test_cache_pods_mount_the_credentials_and_bind_http_to_the_node_ip() -> None:
    objs = cluster_objects({}, keys())
    template = objs["DaemonSet/c1-cache"]["spec"]["template"]
    pod, (container,) = template["spec"], template["spec"]["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["credentials"]["secret"] == {
        "secretName": "c1-cache-credentials",
        "defaultMode": 0o440,
    }
    assert volumes["keys"]["configMap"] == {"name": "c1-cache-keys"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["credentials"]["mountPath"] == "/var/run/lmcache/credentials"
    assert mounts["keys"]["mountPath"] == "/var/run/lmcache/keys"
    assert "subPath" not in mounts["keys"]  # a directory mount: updates arrive in place
    env = env_of(container)
    assert env["HOST_IP"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert env["LMCACHE_HTTP_HOST"] == "$(HOST_IP),127.0.0.1"
    names = [e["name"] for e in container["env"]]
    assert names.index("HOST_IP") < names.index("LMCACHE_HTTP_HOST")  # defined before use
    assert template["metadata"]["annotations"]["lmcache.dev/server-key"] == SERVER[:8]
    keys_cm = objs["ConfigMap/c1-cache-keys"]["data"]
    assert keys_cm == {"clients.pub": f"{OLD} active-t\n", "server.pub": f"{SERVER}\n"}


def test_off_the_host_network_http_binds_the_pod_ip() -> None:
    container = cluster_objects({"hostNetwork": False}, keys())["DaemonSet/c1-cache"]["spec"][
        "template"
    ]["spec"]["containers"][0]
    env = env_of(container)
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["LMCACHE_HTTP_HOST"] == "$(POD_IP),127.0.0.1"


def test_client_keys_do_not_roll_the_cache_pods_a_server_key_does() -> None:
    def template(pub: PublicKeys) -> dict[str, Any]:
        ds = cluster_objects({}, pub)["DaemonSet/c1-cache"]
        return dict(ds["spec"]["template"])

    base = template(keys())
    assert template(keys(SERVER, OLD, NEW)) == base  # a rotation: clients.pub only
    other = template(keys("T" * 40))
    assert other != base
    assert (
        other["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        == base["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    )


def test_render_without_keys_has_no_keys_configmap_nor_key_annotation() -> None:
    objs = cluster_objects({}, None)
    assert "ConfigMap/c1-cache-keys" not in objs
    annotations = objs["DaemonSet/c1-cache"]["spec"]["template"]["metadata"]["annotations"]
    assert "lmcache.dev/server-key" not in annotations


@pytest.mark.parametrize("remote", [False, True])
def test_remote_secret_and_prefix_only_with_a_remote_tier(remote: bool) -> None:
    cache: dict[str, Any] = {"remote": {"url": "redis://r:6379/0"}} if remote else {}
    config = node_config("c1", "ns", LMCacheClusterSpec.model_validate({"cache": cache}))
    assert config["curve_server_key"] == "/var/run/lmcache/credentials/server.key"
    assert config["curve_client_keys"] == "/var/run/lmcache/keys/clients.pub"
    assert config["http_token_file"] == "/var/run/lmcache/credentials/http.token"
    assert ("remote_secret_file" in config) is remote
    if remote:
        assert config["remote_secret_file"] == "/var/run/lmcache/credentials/remote.key"
        assert config["remote_key_prefix"] == "ns/c1"


def test_directory_names_are_unambiguous() -> None:
    assert cluster_directory("a-b", "c") != cluster_directory("a", "b-c")
    assert cluster_directory("team-a", "cache") == "lmcache-team-a.cache"


def test_every_cluster_runs_as_a_user_of_its_own() -> None:
    uids = {server_uid(ns, name) for ns in ("a", "b") for name in ("c1", "c2")}
    assert len(uids) == 4 and IMAGE_UID not in uids
    assert all(RESERVED_ID_MIN <= uid <= RESERVED_ID_MAX for uid in uids)
    spec = LMCacheClusterSpec.model_validate({})
    assert server_uid("ns", "c1") == spec.group("ns", "c1")  # the derived number, reused


def test_secrets_hold_the_documented_keys() -> None:
    server = ServerMaterial("s" * 40, SERVER, "token", "ab" * 32)
    cache = build_cache_secret("c1", "ns", server)
    assert cache["type"] == "Opaque" and cache["metadata"]["name"] == "c1-cache-credentials"
    assert sorted(cache["stringData"]) == ["http.token", "remote.key", "server.key"]
    client = build_client_secret("c1", "ns", ClientMaterial("c" * 40, OLD), SERVER)
    assert client["metadata"]["name"] == "c1-client-credentials"
    assert client["stringData"] == {
        "client.key": "c" * 40 + "\n",
        "client.pub": f"{OLD}\n",
        "server.pub": f"{SERVER}\n",
    }
    assert clients_pub_text([AllowedKey(OLD, "x"), AllowedKey(NEW, "y")]) == f"{OLD} x\n{NEW} y\n"


# ---- vLLM pods ---------------------------------------------------------------------------


def vllm_deployment(pub: PublicKeys | None, **spec: Any) -> dict[str, Any]:
    model = VLLMDeploymentSpec.model_validate(
        {"model": {"name": "m"}, "cache": {"clusterRef": {"name": "c1"}}, **spec}
    )
    cluster = LMCacheClusterSpec.model_validate({})
    conn = CacheConnection.from_cluster("c1", cluster, namespace="ns", keys=pub)
    return build_deployment("llm", "ns", model, conn)


def test_vllm_pods_mount_the_client_keys_and_carry_their_fingerprints() -> None:
    deployment = vllm_deployment(keys())
    template = deployment["spec"]["template"]
    pod = template["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "lmcache-client-credentials")
    assert volume["secret"] == {"secretName": "c1-client-credentials", "defaultMode": 0o440}
    container = pod["containers"][0]
    assert {
        "name": "lmcache-client-credentials",
        "mountPath": "/var/run/lmcache/client",
        "readOnly": True,
    } in container["volumeMounts"]
    assert env_of(container)["LMCACHE_NODE_CREDENTIALS_DIR"] == "/var/run/lmcache/client"
    annotations = template["metadata"]["annotations"]
    assert annotations["lmcache.dev/client-key"] == OLD[:8]
    assert annotations["lmcache.dev/server-key"] == SERVER[:8]
    # our CPU image runs as 65532: it reads the 0440 files through the group
    cpu = vllm_deployment(keys(), engine={"device": "cpu"})["spec"]["template"]["spec"]
    assert cpu["securityContext"]["runAsNonRoot"] is True
    assert cpu["securityContext"]["fsGroup"] in cpu["securityContext"]["supplementalGroups"]


def test_the_consumer_key_rolls_the_vllm_pods_the_allowed_list_does_not() -> None:
    base = template_hash(vllm_deployment(keys(SERVER, OLD)))
    assert template_hash(vllm_deployment(keys(SERVER, OLD, NEW, consumer=OLD[:8]))) == base
    assert template_hash(vllm_deployment(keys(SERVER, OLD, NEW, consumer=NEW[:8]))) != base
    annotations = vllm_deployment(None)["spec"]["template"]["metadata"]["annotations"]
    assert "lmcache.dev/client-key" not in annotations  # keys not made yet: added later


# ---- status ---------------------------------------------------------------------------------


def test_status_round_trip_and_garbage() -> None:
    state = KeyState(
        SERVER,
        (ClientKey(OLD, RETIRING, "t0"), ClientKey(NEW, ACTIVE, "t1")),
        OLD[:8],
        "t0",
        Rotation(ROLLING, "r1", "t1"),
    )
    status = state.to_status("c1")
    assert status["cacheSecret"] == "c1-cache-credentials"
    assert status["keysConfigMap"] == "c1-cache-keys"
    assert KeyState.from_status(status) == state
    assert state.active.public_key == NEW
    assert public_keys_from_status({"credentials": status}) == state.public_keys()
    done = KeyState.from_status({**status, "rotation": {"phase": COMPLETED, "requested": "r1"}})
    assert done is not None and done.rotation == Rotation(COMPLETED, "r1")
    for broken in (
        None,
        {},
        {**status, "serverKey": {"publicKey": "short"}},
        {**status, "clientKeys": [{"publicKey": OLD, "state": RETIRING}]},  # none active
        {**status, "clientKeys": "x"},
    ):
        assert KeyState.from_status(broken) is None  # new Secrets rather than trust it


def test_a_merge_patch_removes_what_the_status_no_longer_has() -> None:
    previous = {"phase": "Ready", "credentials": {"rotation": {"phase": "Completed"}, "x": 1}}
    desired = {"phase": "Ready", "credentials": {"x": 2}}
    assert removals(desired, previous) == {
        "phase": "Ready",
        "credentials": {"x": 2, "rotation": None},
    }
    assert removals({"phase": "Ready"}, previous) == {"phase": "Ready"}  # top level kept


# ---- who still runs the old key ----------------------------------------------------------


def deployment(annotation: str, **status: int) -> dict[str, Any]:
    return {
        "metadata": {"generation": 3},
        "spec": {
            "replicas": 2,
            "template": {"metadata": {"annotations": {"lmcache.dev/client-key": annotation}}},
        },
        "status": {"observedGeneration": 3, **status},
    }


def test_a_consumer_has_rolled_when_its_rollout_is_complete() -> None:
    full = {"updatedReplicas": 2, "replicas": 2, "availableReplicas": 2}
    assert rollout_problem(deployment("new", **full), "new") == ""
    assert rollout_problem(deployment("old", **full), "new") == "not re-applied yet"
    assert rollout_problem(None, "new") == "no Deployment yet"
    surge = {"updatedReplicas": 2, "replicas": 3, "availableReplicas": 2}
    assert rollout_problem(deployment("new", **surge), "new") == "2 of 2 updated, 2 available"
    stale = deployment("new", **full)
    stale["status"]["observedGeneration"] = 2
    assert rollout_problem(stale, "new") == "rollout not started"


def pod(name: str, created: str, secret: str = "c1-client-credentials", **meta: Any) -> Any:
    return {
        "metadata": {"name": name, "creationTimestamp": created, **meta},
        "spec": {"volumes": [{"name": "k", "secret": {"secretName": secret}}]},
        "status": {"phase": "Running"},
    }


def test_other_pods_mounting_the_client_secret_hold_the_rotation_until_they_restart() -> None:
    started = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    pods = [
        pod("old", "2025-12-31T23:59:00Z"),
        pod("same-second", "2026-01-01T00:00:00Z"),
        pod("new", "2026-01-01T00:00:01Z"),
        pod("other-cluster", "2025-12-31T23:59:00Z", secret="c2-client-credentials"),
        pod("going", "2025-12-31T23:59:00Z", deletionTimestamp="2026-01-01T00:00:05Z"),
        pod("ours", "2025-12-31T23:59:00Z", labels={"lmcache.dev/vllm-deployment": "llm"}),
    ]
    assert pods_on_old_key(pods, "c1-client-credentials", {"llm"}, started) == [
        "pod old",
        "pod same-second",
    ]
