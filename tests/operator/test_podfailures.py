"""Failing containers read from pod statuses (pure)."""

from __future__ import annotations

from lmcache_operator.podfailures import DETAIL_CHARS, container_failures, describe


def test_image_pull_failures_quote_the_kubelet() -> None:
    status = {
        "initContainerStatuses": [
            {
                "name": "install-connector",
                "state": {
                    "waiting": {
                        "reason": "ErrImageNeverPull",
                        "message": 'Container image "x:1" is not present with pull policy of Never',
                    }
                },
            }
        ],
        "containerStatuses": [
            {"name": "vllm", "state": {"waiting": {"reason": "PodInitializing"}}}
        ],
    }
    failures = container_failures(status)
    assert failures == [
        {
            "container": "install-connector",
            "reason": "ErrImageNeverPull",
            "detail": 'Container image "x:1" is not present with pull policy of Never',
        }
    ]
    assert describe(failures).startswith("install-connector ErrImageNeverPull (Container image")


def test_oom_killed_shows_even_while_running_again() -> None:
    status = {
        "containerStatuses": [
            {
                "name": "vllm",
                "state": {"running": {}},
                "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
            }
        ]
    }
    assert container_failures(status) == [
        {"container": "vllm", "reason": "OOMKilled", "detail": "exit 137"}
    ]


def test_healthy_and_starting_containers_are_not_failures() -> None:
    status = {
        "containerStatuses": [
            {"name": "a", "state": {"running": {}}, "lastState": {}},
            {"name": "b", "state": {"waiting": {"reason": "ContainerCreating"}}},
            {"name": "c", "state": {"terminated": {"reason": "Completed", "exitCode": 0}}},
        ]
    }
    assert container_failures(status) == []


def test_long_last_lines_are_cut() -> None:
    line = "x" * (DETAIL_CHARS * 2)
    status = {
        "containerStatuses": [
            {
                "name": "server",
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 2, "message": line}},
            }
        ]
    }
    (failure,) = container_failures(status)
    assert failure["detail"].startswith("exit 2: xxx")
    assert len(failure["detail"]) == len("exit 2: ") + DETAIL_CHARS
    assert failure["detail"].endswith("...")
