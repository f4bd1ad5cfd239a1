"""The operator's code layout: import-linter contracts (pyproject.toml) and small handlers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lmcache_operator
import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(lmcache_operator.__file__).parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


@pytest.mark.integration
def test_import_contracts_hold() -> None:
    """Every contract of pyproject.toml (operator and node) is checked and kept."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'node'}{os.pathsep}{REPO / 'operator'}"}
    result = subprocess.run(
        [str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml")],
        capture_output=True, text=True, env=env, cwd=REPO, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
    assert f"{len(contracts['contracts'])} kept, 0 broken" in result.stdout


def test_handler_modules_stay_small() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "wiring").glob("*.py")}
    assert {"lmcachecluster.py", "vllmdeployment.py"} <= sizes.keys()
    assert all(lines < 200 for lines in sizes.values()), sizes


def test_no_kopf_decorator_outside_the_wiring() -> None:
    outside = [
        p.relative_to(PACKAGE)
        for p in PACKAGE.rglob("*.py")
        if "@kopf." in p.read_text() and "wiring" not in p.parts
    ]
    assert outside == []
