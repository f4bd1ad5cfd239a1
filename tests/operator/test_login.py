"""In-cluster login by the API server's IP (no cluster DNS), from a fake ServiceAccount dir."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import pytest
from lmcache_operator.kube import KubeClient, in_cluster, load_credentials
from lmcache_operator.kube.login import from_service_account
from lmcache_operator.wiring.lifecycle import connection_info


def _self_signed(directory: Path) -> Path:
    cert = directory / "ca.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=test", "-keyout", str(directory / "ca.key"), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert


@pytest.fixture
def sa_dir(tmp_path: Path) -> Path:
    (tmp_path / "token").write_text("sa-token\n")
    _self_signed(tmp_path)
    (tmp_path / "namespace").write_text("lmcache-system\n")
    return tmp_path


def test_connection_uses_the_service_host_not_cluster_dns(sa_dir: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "6443"}
    pod = in_cluster(sa_dir, env)
    assert pod is not None
    credentials = from_service_account(pod)
    assert credentials.configuration.host == "https://10.96.0.1:6443"
    assert credentials.token == "sa-token"
    assert credentials.rotates  # projected tokens rotate: read again on a timer and on 401
    info = connection_info(credentials)
    assert info.server == "https://10.96.0.1:6443"
    assert info.token == "sa-token"
    assert info.ca_path == str(sa_dir / "ca.crt")
    assert info.default_namespace == "lmcache-system"
    assert info.expiration is not None  # kopf logs in again and reads the rotated token
    assert info.as_http_headers() == {"Authorization": "Bearer sa-token"}


def test_a_rotated_service_account_token_is_read_again(sa_dir: Path) -> None:
    pod = in_cluster(sa_dir, {"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    assert pod is not None
    credentials = from_service_account(pod)
    (sa_dir / "token").write_text("rotated-token\n")
    asyncio.run(credentials.refresh())
    assert credentials.token == "rotated-token"
    assert connection_info(credentials).token == "rotated-token"


def test_ipv6_service_host_is_bracketed_and_port_defaults_to_443(sa_dir: Path) -> None:
    pod = in_cluster(sa_dir, {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1"})
    assert pod is not None
    assert pod.server == "https://[fd00:10:96::1]:443"
    assert from_service_account(pod).configuration.host == "https://[fd00:10:96::1]:443"


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
    info = connection_info(asyncio.run(load_credentials()))
    assert info.server == "https://127.0.0.1:6443"
    assert info.token == "kc-token"
    assert info.insecure is True
    assert info.expiration is None  # an inline token never changes


def test_load_credentials_in_a_pod_uses_the_same_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("t\n")
    (sa / "ca.crt").write_text("not a certificate\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    credentials = asyncio.run(load_credentials(str(tmp_path / "no-kubeconfig"), sa_dir=sa))
    assert credentials.configuration.host == "https://10.96.0.1:443"

    async def connect() -> None:
        KubeClient(credentials)

    with pytest.raises(ssl.SSLError):  # the fake CA file is read: proves the path is used
        asyncio.run(connect())
