"""VLLMDeployment status and scheduling-gate narrowing: pure functions, no cluster."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmcache_operator.builders.vllm_status import (
    VLLMObserved,
    compute_status,
    pod_summary,
    ready_cache_nodes,
)
from lmcache_operator.controllers.gates import narrowed_affinity
from lmcache_operator.controllers.vllmdeployment import same_status
from lmcache_operator.state import VLLMView

NOW = "2026-11-23T20:00:00Z"


def pod(
    name: str, node: str | None, *, ready: bool = True, gated: bool = False, **status: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": name},
        "spec": {"nodeName": node, **({"schedulingGates": [{"name": "g"}]} if gated else {})},
        "status": {
            "phase": "Running" if node else "Pending",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            **status,
        },
    }
    return pod_summary(body)


def deployment(replicas: int = 2, ready: int = 2, generation: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "status": {
            "observedGeneration": generation,
            "replicas": replicas,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "updatedReplicas": replicas,
        },
    }


BASE = VLLMObserved(
    generation=1,
    desired_replicas=2,
    applied_generation=1,
    min_deployment_generation=1,
    problems=[],
    cache_enabled=True,
    cluster_ref="cache",
    cluster_found=True,
    ready_cache_nodes=frozenset({"gpu-0", "gpu-1"}),
    deployment=deployment(),
    pods=[pod("a", "gpu-0"), pod("b", "gpu-1")],
    url="http://llm.ns.svc:8000/v1",
    selector="app.kubernetes.io/name=vllm,lmcache.dev/vllm-deployment=llm",
)


def cond(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == ctype)


def test_everything_ready() -> None:
    st = compute_status(BASE, NOW)
    assert (st["replicas"], st["readyReplicas"], st["observedGeneration"]) == (2, 2, 1)
    assert st["selector"] == BASE.selector and st["url"] == BASE.url
    assert st["cache"] == {
        "clusterRef": "cache",
        "state": "Ready",
        "nodesWithoutReadyCache": [],
        "compatible": True,
    }
    for ctype, expected in [
        ("Ready", "True"),
        ("Available", "True"),
        ("Progressing", "False"),
        ("CacheReady", "True"),
        ("CacheCompatible", "True"),
        ("ConfigValid", "True"),
        ("ReplicaFailure", "False"),
    ]:
        assert cond(st, ctype)["status"] == expected, ctype


def test_a_node_without_a_ready_cache_is_named() -> None:
    st = compute_status(replace(BASE, ready_cache_nodes=frozenset({"gpu-0"})), NOW)
    assert st["cache"]["state"] == "Degraded"
    assert st["cache"]["nodesWithoutReadyCache"] == ["gpu-1"]
    cache = cond(st, "CacheReady")
    assert cache["status"] == "False" and cache["reason"] == "NodesWithoutReadyCache"
    assert "gpu-1" in cache["message"]
    assert cond(st, "Ready")["status"] == "True"  # replicas still serve (recompute)


def test_missing_cluster_is_a_clear_reason() -> None:
    st = compute_status(replace(BASE, cluster_found=False, ready_cache_nodes=frozenset()), NOW)
    cache = cond(st, "CacheReady")
    assert (cache["status"], cache["reason"]) == ("False", "ClusterNotFound")
    assert "LMCacheCluster 'cache' does not exist" in cache["message"]
    assert cond(st, "CacheCompatible")["status"] == "Unknown"
    assert st["cache"]["state"] == "NotFound" and "compatible" not in st["cache"]


def test_never_applied_waits_for_the_cluster() -> None:
    observed = replace(BASE, applied_generation=None, cluster_found=False, deployment=None, pods=[])
    st = compute_status(observed, NOW)
    assert cond(st, "Ready")["reason"] == "WaitingForCacheCluster"
    assert st["observedGeneration"] is None


def test_incompatible_cluster() -> None:
    st = compute_status(replace(BASE, compat_problems=["chunk size mismatch"]), NOW)
    compat = cond(st, "CacheCompatible")
    assert (compat["status"], compat["message"]) == ("False", "chunk size mismatch")
    assert st["cache"] == {**st["cache"], "state": "Incompatible", "compatible": False}


def test_gated_pods_wait_for_a_ready_cache() -> None:
    observed = replace(
        BASE,
        ready_cache_nodes=frozenset(),
        pods=[pod("a", None, ready=False, gated=True)],
        deployment=deployment(replicas=1, ready=0),
        desired_replicas=1,
    )
    st = compute_status(observed, NOW)
    cache = cond(st, "CacheReady")
    assert cache["reason"] == "NoReadyCacheServer" and "1 replica(s) wait" in cache["message"]
    assert st["cache"]["state"] == "Waiting"
    assert cond(st, "Ready")["status"] == "False"
    assert cond(st, "Progressing")["status"] == "True"


def test_replica_failures_name_the_pod() -> None:
    crash = pod(
        "b",
        "gpu-1",
        ready=False,
        containerStatuses=[
            {"name": "vllm", "state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": {}}
        ],
    )
    oom = pod(
        "c",
        "gpu-0",
        ready=False,
        containerStatuses=[
            {
                "name": "vllm",
                "state": {"running": {}},
                "lastState": {"terminated": {"reason": "OOMKilled"}},
            }
        ],
    )
    st = compute_status(replace(BASE, pods=[pod("a", "gpu-0"), crash, oom]), NOW)
    failure = cond(st, "ReplicaFailure")
    assert failure["status"] == "True" and failure["reason"] == "CrashLoopBackOff"
    assert "pod b: vllm CrashLoopBackOff" in failure["message"]
    assert "pod c: vllm OOMKilled" in failure["message"]
    pull = pod(
        "d",
        None,
        ready=False,
        initContainerStatuses=[
            {"name": "install-connector", "state": {"waiting": {"reason": "ImagePullBackOff"}}}
        ],
    )
    st = compute_status(replace(BASE, pods=[pull]), NOW)
    assert "pod d: install-connector ImagePullBackOff" in cond(st, "ReplicaFailure")["message"]


def test_rolling_out_is_not_ready() -> None:
    dep = deployment()
    dep["metadata"]["generation"] = 2  # the controller has not seen our apply yet
    observed = replace(BASE, generation=2, applied_generation=2, min_deployment_generation=2)
    st = compute_status(replace(observed, deployment=dep), NOW)
    ready = cond(st, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RollingOut")


def test_invalid_spec() -> None:
    observed = replace(BASE, problems=["spec.model.name: required"], applied_generation=None)
    st = compute_status(observed, NOW)
    valid = cond(st, "ConfigValid")
    assert (valid["status"], valid["reason"]) == ("False", "InvalidSpec")
    assert st["observedGeneration"] == 1


def test_disabled_cache() -> None:
    st = compute_status(replace(BASE, cache_enabled=False, cluster_ref=""), NOW)
    assert st["cache"]["state"] == "Disabled"
    assert cond(st, "CacheReady")["reason"] == "CacheDisabled"
    assert cond(st, "Ready")["status"] == "True"


def test_transition_times_move_only_on_change() -> None:
    first = compute_status(BASE, NOW)
    again = compute_status(replace(BASE, previous=first), "2026-11-23T21:00:00Z")
    assert cond(again, "Ready")["lastTransitionTime"] == NOW
    assert same_status(first, again)
    flipped = compute_status(
        replace(BASE, previous=first, ready_cache_nodes=frozenset({"gpu-0"})),
        "2026-11-23T21:00:00Z",
    )
    assert cond(flipped, "CacheReady")["lastTransitionTime"] == "2026-11-23T21:00:00Z"
    assert not same_status(first, flipped)


def test_a_lagging_watch_event_does_not_move_transition_times() -> None:
    """kopf can hand over an event older than the operator's last write: the status is
    judged against that write, so a late event causes no write and no new timestamp."""
    unready = replace(BASE, ready_cache_nodes=frozenset({"gpu-0"}))
    first = compute_status(unready, NOW)
    second = compute_status(replace(BASE, previous=first), "2026-11-23T20:05:00Z")
    view = VLLMView(body={"status": first}, last_written=second)  # the event of `first`
    late = compute_status(replace(BASE, previous=view.recorded_status()), "2026-11-23T20:09:00Z")
    assert cond(late, "CacheReady")["lastTransitionTime"] == "2026-11-23T20:05:00Z"
    assert same_status(late, view.recorded_status())
    assert VLLMView(body={"status": first}).recorded_status() == first  # no write yet


def test_ready_cache_nodes_ignore_unready_and_deleting_pods() -> None:
    pods: list[dict[str, Any]] = [
        {
            "metadata": {},
            "spec": {"nodeName": "n1"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        },
        {
            "metadata": {},
            "spec": {"nodeName": "n2"},
            "status": {"conditions": [{"type": "Ready", "status": "False"}]},
        },
        {
            "metadata": {"deletionTimestamp": "x"},
            "spec": {"nodeName": "n3"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        },
        {"metadata": {}, "spec": {"nodeName": None}, "status": {}},
    ]
    assert ready_cache_nodes(pods) == frozenset({"n1"})


def test_narrowed_affinity_names_the_ready_nodes() -> None:
    spec = {"affinity": {"podAffinity": {"x": 1}}}
    affinity = narrowed_affinity(spec, ["gpu-0", "gpu-1"])
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms == [
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-0"]}]},
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-1"]}]},
    ]
    assert affinity["podAffinity"] == {"x": 1}
    assert spec == {"affinity": {"podAffinity": {"x": 1}}}  # the input is not modified


def test_narrowed_affinity_adds_to_the_users_terms() -> None:
    user = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}]}
    spec = {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [user]}
            }
        }
    }
    affinity = narrowed_affinity(spec, ["n1"])
    (term,) = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"] == [
        {"key": "zone", "operator": "In", "values": ["z1"]},
        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]},
    ]
