"""manifests/install.yaml and the chart's CRD copies are generated, never edited by hand."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.chart.conftest import CHART, REPO, run_helm

pytestmark = pytest.mark.integration  # real server processes / subprocesses

RENDER = REPO / "charts" / "render-install.sh"


def _render_env(helm: str) -> dict[str, str]:
    return {**os.environ, "HELM": helm}


def test_helm_lint_is_clean(helm: str) -> None:
    output = run_helm(helm, "lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in output
    assert "[WARNING]" not in output and "[ERROR]" not in output


def test_install_yaml_is_rendered_from_the_chart(helm: str, tmp_path: Path) -> None:
    fresh = tmp_path / "install.yaml"
    subprocess.run(
        [str(RENDER), "--output", str(fresh)], env=_render_env(helm), check=True, timeout=120
    )
    committed = (REPO / "manifests" / "install.yaml").read_text("utf-8")
    assert fresh.read_text("utf-8") == committed, "manifests/install.yaml is stale: make manifests"


def test_install_yaml_creates_its_namespace_first_and_everything_in_it(helm: str) -> None:
    text = (REPO / "manifests" / "install.yaml").read_text("utf-8")
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert docs[0]["kind"] == "Namespace"
    namespace = docs[0]["metadata"]["name"]
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole"} <= kinds
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for doc in docs:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]


def test_chart_crds_are_a_copy_of_the_generated_crds() -> None:
    generated = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    copied = sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml"))
    assert copied == generated, "the chart's files/crds/ differs from crds/: make manifests"
    for name in generated:
        assert (CHART / "files" / "crds" / name).read_bytes() == (
            REPO / "crds" / name
        ).read_bytes(), f"{name} is stale in the chart: make manifests"


def test_check_mode_detects_a_stale_install_yaml(helm: str, tmp_path: Path) -> None:
    # a copy of the parts the script reads, with one edit to the chart
    copy = tmp_path / "repo"
    for part in ("charts", "crds", "manifests"):
        shutil.copytree(REPO / part, copy / part)
    script = copy / "charts" / "render-install.sh"
    command = [str(script), "--check"]
    env = _render_env(helm)
    ok = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    values = copy / "charts" / "lmcache-operator" / "values.yaml"
    values.write_text(
        values.read_text("utf-8").replace("memory: 256Mi", "memory: 512Mi"), encoding="utf-8"
    )
    stale = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert stale.returncode == 1
    assert "install.yaml" in stale.stderr and "make manifests" in stale.stderr
