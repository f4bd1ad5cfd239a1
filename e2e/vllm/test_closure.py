"""The connector imports in a vLLM environment with nothing added (e2e/vllm/closure.py).

Runs in .venv-vllm (make e2e-vllm), which scripts/vllm-venv.sh builds as vLLM + its own
dependencies + this project installed --no-deps: the connector's import closure must stay
inside vLLM's requirements, so a stock vLLM image can load it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lmcache_node.server.process import free_port

pytestmark = [pytest.mark.vllm]
pytest.importorskip("vllm", reason="vLLM is not installed here: run `make e2e-vllm`")

REPO = Path(__file__).resolve().parents[2]


def closure_report(*args: str) -> tuple[int, dict[str, Any]]:
    """Run the check in a fresh interpreter of this venv (nothing imported beforehand)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "node"), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-m", "e2e.vllm.closure", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False,
    )  # fmt: skip
    assert done.stdout.strip(), done.stderr[-3000:]
    return done.returncode, json.loads(done.stdout)


def test_connector_closure_is_inside_vllms_requirements() -> None:
    code, report = closure_report()
    assert report["problems"] == []
    assert code == 0
    loaded = set(report["loaded_modules"])
    assert {"lmcache_node.vllm.connector", "lmcache_node.client.node_client",
            "lmcache_node.keys", "lmcache_node.protocol.credentials"} <= loaded  # fmt: skip
    assert not any(m.startswith(("lmcache_node.engine", "lmcache_node.tiers")) for m in loaded)
    assert set(report["static_closure"]) >= loaded


def test_the_check_names_a_server_module_and_its_dependency() -> None:
    """The same check on a server module fails, naming the layer and the foreign import."""
    code, report = closure_report("--module", "lmcache_node.assembly")
    problems = "\n".join(report["problems"])
    assert code == 1
    layer = "lmcache_node.assembly is reached from the connector but belongs to the server"
    assert layer in problems
    assert "lmcache_node.config imports 'pydantic_settings'" in problems


def test_the_server_cli_without_its_extra_names_the_extra() -> None:
    """In a venv with the connector only, `lmcache-node serve` says which extra to install."""
    if any(importlib.util.find_spec(m) for m in ("xxhash", "redis", "lz4", "zstandard")):
        pytest.skip("this venv also has the server's dependencies (build it with vllm-venv.sh)")
    env = {**os.environ, "PYTHONPATH": str(REPO / "node")}
    done = subprocess.run(
        [sys.executable, "-m", "lmcache_node", "serve", "--port", str(free_port()),
         "--http-port", "0"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "pip install 'lmcache-k8s[node]'" in done.stderr
