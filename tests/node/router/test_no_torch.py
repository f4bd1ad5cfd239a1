"""The router runs without torch (the [router] extra, no vLLM, no GPU stack)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # real server processes / subprocesses

CODE = """
import sys
sys.modules['torch'] = None  # any import of torch fails
import lmcache_node.router.app, lmcache_node.router.cli
from lmcache_node.cli import main
print('ok')
"""


def test_the_router_imports_without_torch() -> None:
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_command_says_what_it_needs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lmcache_node.cli", "router", "--endpoints", "ftp://x"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "http(s) URL" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "lmcache_node.cli", "router"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "exactly one of --endpoints" in result.stderr
