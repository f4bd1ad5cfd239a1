"""Status computation from DaemonSet and pod observations (pure)."""

from __future__ import annotations

from typing import Any

from lmcache_operator.status import Observed, compute_status, same_status


def ds(desired: int, ready: int, updated: int | None = None, generation: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "status": {
            "observedGeneration": generation,
            "desiredNumberScheduled": desired,
            "currentNumberScheduled": desired,
            "numberReady": ready,
            "updatedNumberScheduled": desired if updated is None else updated,
            "numberUnavailable": desired - ready,
        },
    }


def pod(node: str, ready: bool = True, restarts: int = 0) -> dict[str, Any]:
    return {
        "metadata": {"name": f"p-{node}"},
        "spec": {"nodeName": node},
        "status": {
            "phase": "Running",
            "hostIP": "10.0.0.1",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [{"restartCount": restarts}],
        },
    }


def observe(**overrides: Any) -> Observed:
    fields: dict[str, Any] = {
        "generation": 1,
        "applied_generation": 1,
        "min_daemonset_generation": 1,
        "problems": [],
        "port": 5555,
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "daemonset": ds(2, 2),
        "pods": [pod("gpu-0"), pod("gpu-1")],
        "previous": {},
    }
    fields.update(overrides)
    return Observed(**fields)


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_ready_when_every_node_is_ready() -> None:
    status = compute_status(observe())
    assert status["phase"] == "Ready"
    assert (status["desiredNodes"], status["readyNodes"], status["observedGeneration"]) == (2, 2, 1)
    assert [e["node"] for e in status["endpoints"]] == ["gpu-0", "gpu-1"]
    assert status["endpoints"][0] == {
        "node": "gpu-0",
        "hostIP": "10.0.0.1",
        "port": 5555,
        "pod": "p-gpu-0",
        "ready": True,
        "restarts": 0,
    }
    conds = conditions(status)
    assert set(conds) == {"Ready", "Available", "Progressing", "Degraded", "ConfigValid"}
    assert conds["Ready"]["status"] == "True" and conds["Degraded"]["status"] == "False"


def test_pods_starting_is_progressing_not_degraded() -> None:
    status = compute_status(observe(daemonset=ds(2, 1), pods=[pod("gpu-0"), pod("gpu-1", False)]))
    assert status["phase"] == "Progressing"
    assert conditions(status)["Progressing"]["status"] == "True"


def test_losing_a_node_after_ready_is_degraded_and_names_it() -> None:
    previous = compute_status(observe())
    status = compute_status(
        observe(daemonset=ds(2, 1), pods=[pod("gpu-0"), pod("gpu-1", False)], previous=previous)
    )
    assert status["phase"] == "Degraded"
    degraded = conditions(status)["Degraded"]
    assert degraded["status"] == "True"
    assert "gpu-1" in degraded["message"]
    assert conditions(status)["Available"]["status"] == "True"


def test_missing_pod_after_ready_is_degraded() -> None:
    previous = compute_status(observe())
    status = compute_status(observe(daemonset=ds(2, 1), pods=[pod("gpu-0")], previous=previous))
    assert status["phase"] == "Degraded"
    assert "1 node(s) without a cache pod" in conditions(status)["Degraded"]["message"]


def test_stale_daemonset_is_progressing() -> None:
    # our apply produced generation 2, the watch still shows generation 1 as all ready
    status = compute_status(observe(generation=2, applied_generation=2, min_daemonset_generation=2))
    assert status["phase"] == "Progressing"
    assert status["observedGeneration"] == 2


def test_rolling_update_is_progressing_until_every_node_is_updated() -> None:
    status = compute_status(observe(daemonset=ds(2, 2, updated=1)))
    assert status["phase"] == "Progressing"
    assert conditions(status)["Progressing"]["reason"] == "RollingOut"


def test_no_matching_nodes_is_pending_with_the_selector() -> None:
    status = compute_status(observe(daemonset=ds(0, 0), pods=[]))
    assert status["phase"] == "Pending"
    assert "nvidia.com/gpu.present=true" in conditions(status)["Ready"]["message"]


def test_invalid_spec_is_failed_with_config_valid_false() -> None:
    status = compute_status(observe(problems=["spec.x: bad"], applied_generation=None))
    assert status["phase"] == "Failed"
    valid = conditions(status)["ConfigValid"]
    assert (valid["status"], valid["reason"], valid["message"]) == (
        "False",
        "InvalidSpec",
        "spec.x: bad",
    )
    assert status["observedGeneration"] == 1


def test_restarts_and_deleting_pods_are_reported() -> None:
    terminating = pod("gpu-1")
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status = compute_status(observe(pods=[pod("gpu-0", restarts=3), terminating]))
    endpoints = {e["node"]: e for e in status["endpoints"]}
    assert endpoints["gpu-0"]["restarts"] == 3
    assert endpoints["gpu-1"]["ready"] is False


def test_transition_times_move_only_when_a_condition_flips() -> None:
    first = compute_status(observe(), now="2026-01-01T00:00:00Z")
    again = compute_status(observe(previous=first), now="2026-01-01T00:05:00Z")
    assert same_status(first, again)
    assert conditions(again)["Ready"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    broken = compute_status(
        observe(daemonset=ds(2, 1), pods=[pod("gpu-0"), pod("gpu-1", False)], previous=again),
        now="2026-01-01T00:06:00Z",
    )
    assert not same_status(again, broken)
    assert conditions(broken)["Ready"]["lastTransitionTime"] == "2026-01-01T00:06:00Z"
    assert conditions(broken)["ConfigValid"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"


def test_monitoring_condition_is_added() -> None:
    monitor = {
        "type": "ServiceMonitorReady",
        "status": "False",
        "reason": "CRDNotInstalled",
        "message": "m",
    }
    status = compute_status(observe(monitoring_condition=monitor))
    assert conditions(status)["ServiceMonitorReady"]["reason"] == "CRDNotInstalled"


def crash_looping(node: str, restarts: int = 5, last_line: str = "") -> dict[str, Any]:
    failing = pod(node, ready=False, restarts=restarts)
    failing["status"]["containerStatuses"] = [
        {
            "name": "server",
            "restartCount": restarts,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 1m20s"}},
            "lastState": {
                "terminated": {
                    "reason": "Error",
                    "exitCode": 1,
                    "message": f"INFO starting\n{last_line}\n",
                }
            },
        }
    ]
    return failing


def test_a_crash_looping_server_is_degraded_with_its_last_words() -> None:
    """Not 'Progressing' forever: the first rollout already says which pod fails and why."""
    line = "lmcache-node serve: [Errno 1] Operation not permitted: '/dev/shm/x'"
    status = compute_status(
        observe(daemonset=ds(2, 1), pods=[pod("gpu-0"), crash_looping("gpu-1", last_line=line)])
    )
    assert status["phase"] == "Degraded"
    degraded = conditions(status)["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "ServersFailing"
    assert f"p-gpu-1 on gpu-1: server CrashLoopBackOff (exit 1: {line})" in degraded["message"]
    assert conditions(status)["Ready"]["status"] == "False"


def test_a_restarting_pod_that_is_ready_again_is_not_failing() -> None:
    recovered = crash_looping("gpu-1")
    recovered["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    recovered["status"]["containerStatuses"][0]["state"] = {"running": {}}
    status = compute_status(observe(pods=[pod("gpu-0"), recovered]))
    assert status["phase"] == "Ready"


def test_each_endpoint_says_what_its_server_serves() -> None:
    status = compute_status(observe(device="cuda"))
    assert [e["device"] for e in status["endpoints"]] == ["cuda", "cuda"]
    assert "device" not in compute_status(observe())["endpoints"][0]  # unknown: not claimed


def test_a_server_that_cannot_serve_its_device_is_degraded_with_the_reason() -> None:
    line = (
        "lmcache-node serve: --device cuda, but CUDA is unavailable: the NVIDIA driver library "
        "(libcuda.so.1) is not visible in this container: run the pod with runtimeClassName: "
        "nvidia"
    )
    failing = crash_looping("gpu-1", last_line=line)
    failing["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] = 2
    status = compute_status(observe(device="cuda", pods=[pod("gpu-0"), failing]))
    degraded = conditions(status)["Degraded"]
    assert degraded["reason"] == "ServersFailing"
    assert (
        "p-gpu-1 on gpu-1: server CrashLoopBackOff (exit 2: lmcache-node serve: --device "
        in (degraded["message"])
    )
    assert "CUDA is unavailable" in degraded["message"]
