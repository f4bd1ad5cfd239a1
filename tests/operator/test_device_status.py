"""What each node server serves, and why one cannot: status.endpoints[].device and Degraded.

A server started with ``--device cuda`` where CUDA cannot work exits at once with the
reason; its pod crash-loops and the cluster's Degraded condition quotes that last line
(terminationMessagePolicy FallbackToLogsOnError). kwok runs no container, so the test runs
the real server here (a CPU-only PyTorch: CUDA cannot work), takes its last line and puts
it where the kubelet would: the pod's container status.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.operator.conftest import OperatorProcess
from tests.operator.kubectl import Cluster
from tests.operator.test_cluster import condition, manifest, status, wait_ready
from tests.support import wait_until

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[2]


def _server_exit_line(tmp_path: Path) -> str:
    """The real server's last words for --device cuda on this machine (no CUDA)."""
    result = subprocess.run(
        [sys.executable, "-m", "lmcache_node.server", "--device", "cuda", "--http-port", "0",
         "--port", "45731", "--shm-dir", str(tmp_path / "shm")],
        capture_output=True, text=True, timeout=120, check=False,
        env={"PYTHONPATH": f"{REPO / 'node'}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )  # fmt: skip
    if result.returncode == 0 or "CUDA is unavailable" not in result.stderr:
        pytest.skip(f"CUDA works here: the server did not refuse --device cuda ({result.stderr})")
    assert result.returncode == 2
    return result.stderr.strip().splitlines()[-1]


def test_endpoints_say_the_device_and_a_server_that_cannot_serve_it_is_named(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    k8s_cluster.apply(manifest(), namespace)  # GPU nodes: device auto serves cuda
    st = wait_ready(k8s_cluster, namespace)
    assert [e["device"] for e in st["endpoints"]] == ["cuda", "cuda"]

    line = _server_exit_line(tmp_path)
    assert line.startswith("lmcache-node serve: --device cuda, but CUDA is unavailable")
    victim = next(e for e in st["endpoints"] if e["node"] == "gpu-1")["pod"]
    crash = [
        {
            "op": "replace",
            "path": "/status/containerStatuses/0/state",
            "value": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
        },
        {
            "op": "replace",
            "path": "/status/containerStatuses/0/lastState",
            "value": {
                "terminated": {
                    "reason": "Error",
                    "exitCode": 2,
                    "message": f"INFO loading config\n{line}\n",
                    "startedAt": "2026-01-01T00:00:00Z",
                    "finishedAt": "2026-01-01T00:00:01Z",
                }
            },
        },
        {"op": "replace", "path": "/status/containerStatuses/0/ready", "value": False},
    ]
    ready = next(
        i
        for i, c in enumerate(k8s_cluster.get("pod", victim, namespace)["status"]["conditions"])  # type: ignore[index]
        if c["type"] == "Ready"
    )
    crash.append({"op": "replace", "path": f"/status/conditions/{ready}/status", "value": "False"})
    k8s_cluster.kubectl(
        "patch", "pod", victim, "-n", namespace, "--subresource=status", "--type=json",
        "-p", json.dumps(crash),
    )  # fmt: skip
    degraded = wait_until(
        lambda: (
            (s := status(k8s_cluster, namespace)).get("phase") == "Degraded"
            and condition(s, "Degraded").get("reason") == "ServersFailing"
            and s
        ),
        30,
        "Degraded quoting the server's device error",
    )
    message = condition(degraded, "Degraded")["message"]
    assert f"{victim} on gpu-1: lmcache-node CrashLoopBackOff (exit 2: {line[:200]}" in message
