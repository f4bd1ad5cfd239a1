"""Modules stay small enough to read in one sitting: a module of the node or the operator
over MAX_LINES lines says at its top why (a comment starting "# Long on purpose")."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = (REPO / "node" / "lmcache_node", REPO / "operator" / "lmcache_operator")
MAX_LINES = 420  # "~400"
REASON = "# Long on purpose"


def test_long_modules_say_why() -> None:
    unexplained = [
        f"{path.relative_to(REPO)} ({lines} lines)"
        for package in PACKAGES
        for path in sorted(package.rglob("*.py"))
        if (lines := len((text := path.read_text(encoding="utf-8")).splitlines())) > MAX_LINES
        and not text.startswith(REASON)
    ]
    assert unexplained == [], f"split them, or start them with {REASON!r}: why"
