"""Regenerate operator/lmcache_operator/api/k8s_core_v1.json from a Kubernetes API server.

The CRDs type their pod pass-through fields (tolerations, affinity, env, volumes, security
contexts, ...) with these core/v1 schemas; the file records the Kubernetes version it came
from. Run it against the pinned local API server, then `make crds`:

    ../shared/k8s/up.sh --dir /tmp/k8s-openapi
    KUBECONFIG=/tmp/k8s-openapi/admin.kubeconfig python scripts/k8s_openapi.py
    python scripts/k8s_openapi.py --check   # exit 1 when the committed file differs

Needs `kubectl` on PATH (../shared/k8s/install.sh prints its folder).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from lmcache_operator.k8s_openapi import extract

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "operator" / "lmcache_operator" / "api" / "k8s_core_v1.json"


def _kubectl(*args: str) -> str:
    return subprocess.run(
        ["kubectl", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def render() -> str:
    """The file's text, from the API server the current kubeconfig names."""
    openapi = json.loads(_kubectl("get", "--raw", "/openapi/v3/api/v1"))
    version = json.loads(_kubectl("get", "--raw", "/version"))["gitVersion"]
    return json.dumps(extract(openapi, version), indent=1, sort_keys=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
        if current != text:
            print(f"{args.output} is stale: run scripts/k8s_openapi.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
