"""Regenerate docs/reference from the code, or check that it is current (`make docs`,
`make docs-check`): the CRD reference (lmcache_operator.docgen, from the CRD schemas) and the
node configuration reference (lmcache_node.docgen, from NodeConfig).

    python scripts/docgen.py [--check] [--dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lmcache_node import docgen as node_docgen
from lmcache_operator import docgen as operator_docgen

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "docs" / "reference"
FIX = "make docs"


def pages() -> dict[str, str]:
    """File name -> text of every generated reference page."""
    return {**operator_docgen.files(), **node_docgen.files()}


def stale(directory: Path, wanted: dict[str, str]) -> list[Path]:
    """Pages in ``directory`` that are missing or differ from ``wanted``."""
    return [
        directory / name
        for name, text in wanted.items()
        if not (directory / name).is_file()
        or (directory / name).read_text(encoding="utf-8") != text
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a page is stale")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="docs/reference")
    args = parser.parse_args(argv)
    wanted = pages()
    if args.check:
        outdated = stale(args.dir, wanted)
        for path in outdated:
            print(f"{path} is stale or missing: run `{FIX}`", file=sys.stderr)
        return 1 if outdated else 0
    args.dir.mkdir(parents=True, exist_ok=True)
    for name, text in wanted.items():
        (args.dir / name).write_text(text, encoding="utf-8")
        print(args.dir / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
