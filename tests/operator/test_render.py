"""`lmcache-operator render`: objects without a cluster; user mistakes name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lmcache_operator.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "manifests" / "examples").glob("lmcachecluster*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_render(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["render", "-f", str(example)]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    kinds = [o["kind"] for o in objects]
    assert kinds[:4] == ["ConfigMap", "Service", "Service", "DaemonSet"]


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("{cache: {cpuSize: 4GB}}", "spec.cache.cpuSize"),
        ("{cache: {cpuSzie: 4Gi}}", "spec.cache.cpuSzie: unknown field"),
        ("{server: {port: http}}", "spec.server.port"),
    ],
)
def test_user_mistakes_name_the_field(
    spec: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "apiVersion: lmcache.dev/v1alpha1\nkind: LMCacheCluster\n"
        f"metadata: {{name: x}}\nspec: {spec}\n"
    )
    assert cli_main(["render", "-f", str(path)]) == 1
    assert fragment in capsys.readouterr().err


def test_wrong_kind_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pod.yaml"
    path.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
    assert cli_main(["render", "-f", str(path)]) == 1
    assert "expected kind LMCacheCluster" in capsys.readouterr().err
    assert cli_main(["render", "-f", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
