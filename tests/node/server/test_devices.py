"""The device is checked at start: --device cuda without a usable GPU stops the server."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from lmcache_node.devices import DRIVER_LIBRARY, CudaFacts, cuda_problem, resolve_device
from lmcache_node.server.process import ServerProcess, free_port

GPU_BUILD = CudaFacts(
    torch_version="2.14.1+cu128",
    torch_cuda="12.8",
    available=True,
    driver_loadable=True,
    nvidia_visible="all",
    cuda_visible=None,
)

pytestmark = pytest.mark.integration  # real server processes / subprocesses


def test_a_working_cuda_has_no_problem() -> None:
    assert cuda_problem(GPU_BUILD) is None


def test_a_cpu_only_torch_names_the_cuda_image() -> None:
    problem = cuda_problem(dataclasses.replace(GPU_BUILD, torch_cuda=None, available=False))
    assert problem is not None
    assert "CPU-only build" in problem and "-cuda" in problem


def test_a_missing_driver_names_the_runtime_class() -> None:
    facts = dataclasses.replace(
        GPU_BUILD, available=False, driver_loadable=False, nvidia_visible=None
    )
    problem = cuda_problem(facts)
    assert problem is not None
    assert DRIVER_LIBRARY in problem and "runtimeClassName: nvidia" in problem


def test_no_visible_device_names_the_visibility_variables() -> None:
    facts = dataclasses.replace(GPU_BUILD, available=False, nvidia_visible="void")
    problem = cuda_problem(facts)
    assert problem is not None
    assert "NVIDIA_VISIBLE_DEVICES (now: 'void'" in problem


def test_auto_and_cpu_resolve_here() -> None:
    assert resolve_device("cpu").device == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    choice = resolve_device("auto")
    assert choice.device == expected and choice.reason.startswith("auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable CUDA")
def test_serve_with_device_cuda_exits_at_start_saying_why() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lmcache_node.server", "--device", "cuda", "--port",
         str(free_port()), "--http-port", "0"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--device cuda, but CUDA is unavailable" in result.stderr
    assert cuda_problem() in result.stderr  # type: ignore[operator]


@pytest.mark.slow
def test_auto_logs_its_choice_and_readyz_stats_metrics_name_the_device(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with ServerProcess("--device", "auto", "--cpu-buffer-size", "0.05", log_file=log) as proc:
        metrics = _get(proc.http_url + "/metrics")
        ready = json.loads(_get(proc.http_url + "/readyz"))
        stats = json.loads(_get(proc.http_url + "/stats"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert ready["device"] == device and stats["device"] == device
    assert f'device="{device}"' in metrics.split("lmcache_node_server_info{", 1)[1].split("}")[0]
    assert f"serving device {device} (auto:" in log.read_text()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())
