"""Why a pod's containers cannot run, from its status (both kinds report it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# waiting/terminated reasons that need a person (a restart will not fix them by itself)
FAILURE_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "OOMKilled",
    }
)
DETAIL_CHARS = 240


def _detail(waiting: Mapping[str, Any], terminated: Mapping[str, Any]) -> str:
    """Exit code and the last line the container left (FallbackToLogsOnError), or the
    kubelet's message (image pulls, config errors)."""
    parts = []
    if terminated.get("exitCode") is not None:
        parts.append(f"exit {terminated['exitCode']}")
    text = str(terminated.get("message") or waiting.get("message") or "").strip()
    if text:
        line = text.splitlines()[-1].strip()
        parts.append(line if len(line) <= DETAIL_CHARS else line[: DETAIL_CHARS - 3] + "...")
    return ": ".join(parts)


def container_failures(pod_status: Mapping[str, Any]) -> list[dict[str, str]]:
    """[{container, reason, detail}] for each init or main container that is failing."""
    statuses = [
        *(pod_status.get("initContainerStatuses") or []),
        *(pod_status.get("containerStatuses") or []),
    ]
    failures = []
    for container in statuses:
        state = container.get("state") or {}
        waiting = state.get("waiting") or {}
        last = (container.get("lastState") or {}).get("terminated") or {}
        terminated = state.get("terminated") or last
        reason = waiting.get("reason") or (state.get("terminated") or {}).get("reason")
        if reason not in FAILURE_REASONS and last.get("reason") == "OOMKilled":
            reason = "OOMKilled"
        if reason in FAILURE_REASONS:
            failures.append(
                {
                    "container": str(container.get("name", "?")),
                    "reason": str(reason),
                    "detail": _detail(waiting, terminated),
                }
            )
    return failures


def describe(failures: list[dict[str, str]]) -> str:
    """'server CrashLoopBackOff (exit 1: lmcache-node serve: ...)', comma-separated."""
    return ", ".join(
        f"{f['container']} {f['reason']}" + (f" ({f['detail']})" if f.get("detail") else "")
        for f in failures
    )
