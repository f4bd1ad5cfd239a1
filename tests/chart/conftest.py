"""Fixtures for chart tests: a helm binary (../shared/k8s) and a template renderer."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lmcache-operator"
K8S_DIR = Path(os.environ.get("LMCACHE_K8S_DIR", REPO.parent / "shared" / "k8s"))

Render = Callable[..., list[dict[str, Any]]]


def _find_helm() -> str | None:
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    install = K8S_DIR / "install.sh"
    if install.is_file():
        result = subprocess.run(
            [str(install)], capture_output=True, text=True, timeout=300, check=False
        )
        if result.returncode == 0 and result.stdout.strip():
            candidate = Path(result.stdout.strip().splitlines()[-1]) / "helm"
            if candidate.is_file():
                return str(candidate)
    return shutil.which("helm")


@pytest.fixture(scope="session")
def helm() -> str:
    found = _find_helm()
    if found is None:
        message = (
            f"HELM UNAVAILABLE (no $HELM, no {K8S_DIR}/install.sh, no helm on PATH): "
            "chart tests skipped"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; under CI=true this is a failure", pytrace=False)
        pytest.skip(message)
    return found


class HelmError(RuntimeError):
    """helm exited non-zero; the message holds its stderr."""


def run_helm(helm: str, *args: str) -> str:
    result = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise HelmError(result.stderr.strip() or result.stdout.strip())
    return result.stdout


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    """render(set={...}, api_versions=[...], namespace=...) -> the rendered objects."""

    def _render(
        set_values: dict[str, str] | None = None,
        *,
        values: dict[str, Any] | None = None,
        api_versions: Sequence[str] = (),
        namespace: str = "lmcache-system",
        release: str = "lmc",
        tmp_path: Path | None = None,
    ) -> list[dict[str, Any]]:
        args = ["template", release, str(CHART), "--namespace", namespace]
        for key, value in (set_values or {}).items():
            args += ["--set", f"{key}={value}"]
        for api in api_versions:
            args += ["--api-versions", api]
        if values is not None:
            assert tmp_path is not None, "values= needs tmp_path="
            path = tmp_path / "values.yaml"
            path.write_text(yaml.safe_dump(values), encoding="utf-8")
            args += ["--values", str(path)]
        text = run_helm(helm, *args)
        return [doc for doc in yaml.safe_load_all(text) if doc]

    return _render


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]
