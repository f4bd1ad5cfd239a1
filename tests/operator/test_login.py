"""In-cluster login by the API server's IP (no cluster DNS), from a fake ServiceAccount dir."""

from __future__ import annotations

import ssl
from pathlib import Path

import kopf
import pytest
from lmcache_operator.kube import in_cluster, load_credentials
from lmcache_operator.runner import _login, in_cluster_connection


@pytest.fixture
def sa_dir(tmp_path: Path) -> Path:
    (tmp_path / "token").write_text("sa-token\n")
    (tmp_path / "ca.crt").write_text("not parsed here\n")
    (tmp_path / "namespace").write_text("lmcache-system\n")
    return tmp_path


def test_connection_uses_the_service_host_not_cluster_dns(sa_dir: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "6443"}
    pod = in_cluster(sa_dir, env)
    assert pod is not None
    info = in_cluster_connection(pod)
    assert info.server == "https://10.96.0.1:6443"
    assert info.token == "sa-token"
    assert info.ca_path == str(sa_dir / "ca.crt")
    assert info.default_namespace == "lmcache-system"
    assert info.as_http_headers() == {"Authorization": "Bearer sa-token"}


def test_ipv6_service_host_is_bracketed_and_port_defaults_to_443(sa_dir: Path) -> None:
    pod = in_cluster(sa_dir, {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1"})
    assert pod is not None
    assert pod.server == "https://[fd00:10:96::1]:443"


def test_not_in_cluster_without_the_env_or_the_token(sa_dir: Path, tmp_path: Path) -> None:
    assert in_cluster(sa_dir, {}) is None
    assert in_cluster(tmp_path / "absent", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is None


def test_login_outside_a_pod_reads_the_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443', "
        "insecure-skip-tls-verify: true}}]\n"
        "users: [{name: u, user: {token: kc-token}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    info = _login(settings=kopf.OperatorSettings())
    assert info is not None
    assert info.server == "https://127.0.0.1:6443"
    assert info.token == "kc-token"


def test_load_credentials_in_a_pod_uses_the_same_server(
    sa_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lmcache_operator.kube.SA_DIR", sa_dir)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(ssl.SSLError):  # the fake CA file is read: proves the path is used
        load_credentials(str(tmp_path / "no-kubeconfig"))
