"""scripts/docgen.py: `make docs` writes docs/reference, `make docs-check` names stale pages.

That the committed pages are current is checked page by page in tests/*/test_docgen.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # real server processes / subprocesses

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "docgen.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False
    )


def test_check_names_each_stale_page_and_the_fix(tmp_path: Path) -> None:
    missing = run("--check", "--dir", str(tmp_path))
    assert missing.returncode == 1
    for name in ("crds.md", "configuration.md"):
        assert f"{tmp_path / name} is stale or missing: run `make docs`" in missing.stderr
    assert run("--dir", str(tmp_path)).returncode == 0
    assert run("--check", "--dir", str(tmp_path)).returncode == 0
    page = tmp_path / "configuration.md"
    page.write_text(page.read_text(encoding="utf-8") + "edited\n", encoding="utf-8")
    edited = run("--check", "--dir", str(tmp_path))
    assert edited.returncode == 1
    assert "configuration.md" in edited.stderr and "crds.md" not in edited.stderr
