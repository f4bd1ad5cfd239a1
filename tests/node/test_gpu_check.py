"""`make gpu-check` parses its arguments and runs its CPU-safe part here (no CUDA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "scripts" / "gpu-check.sh"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        torch.cuda.is_available(), reason="with CUDA, `make gpu-check` runs the whole check"
    ),
]


def run(*args: str, wheels: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_WHEELS": str(wheels)}
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_bad_arguments_print_the_usage(tmp_path: Path) -> None:
    for args in ((), (str(tmp_path), "--bogus")):
        result = run(*args, wheels=tmp_path)
        assert result.returncode == 2
        assert "usage:" in result.stderr


def test_without_cuda_it_reports_why_and_fails_unless_allowed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    refused = run(str(out), wheels=tmp_path / "none")
    assert refused.returncode == 2
    assert "no usable CUDA here" in refused.stderr
    allowed = run(str(out), "--allow-no-cuda", wheels=tmp_path / "none")
    assert allowed.returncode == 0, allowed.stderr
    env = json.loads((out / "env.json").read_text())
    assert env["cuda_available"] is False and env["torch"] == torch.__version__
    assert "CPU-only build" in env["cuda_problem"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "no-cuda" and "CPU-only" in summary["reason"]
