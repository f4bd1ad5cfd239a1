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


def _write(tmp_path: Path, spec: str) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "apiVersion: lmcache.dev/v1alpha1\nkind: LMCacheCluster\n"
        f"metadata: {{name: x, namespace: ml}}\nspec: {spec}\n"
    )
    return str(path)


def test_render_applies_the_charts_guard_rails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = _write(tmp_path, "{cache: {disk: {path: /data/cache, size: 1Gi}}}")
    assert cli_main(["render", "-f", outside]) == 1
    err = capsys.readouterr().err
    assert "spec.cache.disk.path: '/data/cache' is not under an allowed host path prefix" in err
    assert "allowedHostPathPrefixes" in err
    prefixes = ["--allowed-host-path-prefix", "/data", "--allowed-host-path-prefix", "/dev/shm"]
    assert cli_main(["render", "-f", outside, *prefixes]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    pod = next(o for o in objects if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    disk = next(v for v in pod["volumes"] if v["name"] == "disk")
    assert disk["hostPath"]["path"] == "/data"

    privileged = _write(tmp_path, "{pod: {containerSecurityContext: {privileged: true}}}")
    assert cli_main(["render", "-f", privileged]) == 1
    assert "spec.pod.containerSecurityContext.privileged" in capsys.readouterr().err
    assert cli_main(["render", "-f", privileged, "--allow-privileged-pass-through"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    pod = next(o for o in objects if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert pod["containers"][0]["securityContext"]["privileged"] is True


def test_an_unusable_prefix_flag_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "{}")
    assert cli_main(["render", "-f", path, "--allowed-host-path-prefix", "/etc"]) == 2
    assert "allowed host path prefix '/etc' must not be / or a system directory" in (
        capsys.readouterr().err
    )
    assert cli_main(["render", "-f", path, "--allowed-host-path-prefix", "/mnt/"]) == 2
    assert "'/mnt/' must be a normalised absolute path" in capsys.readouterr().err
