"""The client's helpers: REST paths and kubeconfig credentials (no cluster needed)."""

from __future__ import annotations

import asyncio
import base64
import subprocess
from pathlib import Path

import pytest
import yaml
from lmcache_operator.kube import KubeClient, load_credentials, object_path, resource_of


@pytest.mark.parametrize(
    ("args", "path"),
    [
        (("v1", "ConfigMap", "ns", "c"), "/api/v1/namespaces/ns/configmaps/c"),
        (("apps/v1", "DaemonSet", "ns", None), "/apis/apps/v1/namespaces/ns/daemonsets"),
        (("v1", "Node", None, "gpu-0"), "/api/v1/nodes/gpu-0"),
        (("v1", "Namespace", "ignored", "x"), "/api/v1/namespaces/x"),
        (
            ("lmcache.dev/v1alpha1", "LMCacheCluster", "ns", "c"),
            "/apis/lmcache.dev/v1alpha1/namespaces/ns/lmcacheclusters/c",
        ),
    ],
)
def test_object_paths(args: tuple[str, str, str | None, str | None], path: str) -> None:
    assert object_path(*args) == path


def test_request_counter_names_resource_and_subresource() -> None:
    assert resource_of("/apis/lmcache.dev/v1alpha1/namespaces/n/lmcacheclusters/c/status") == (
        "lmcacheclusters/status"
    )
    assert resource_of("/api/v1/namespaces/n/pods") == "pods"


def _self_signed(tmp_path: Path) -> Path:
    cert = tmp_path / "ca.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=test",
            "-keyout",
            str(tmp_path / "ca.key"),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert


def test_kubeconfig_with_token_and_ca_data(tmp_path: Path) -> None:
    cert = _self_signed(tmp_path)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": "https://127.0.0.1:6443/",
                    "certificate-authority-data": base64.b64encode(cert.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": "u", "user": {"token": "secret-token"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    credentials = asyncio.run(load_credentials(str(path)))
    assert credentials.configuration.host == "https://127.0.0.1:6443"
    assert credentials.token == "secret-token"
    assert not credentials.rotates  # an inline token: nothing to read again
    ca_file = credentials.configuration.ssl_ca_cert
    assert ca_file and Path(ca_file).read_bytes() == cert.read_bytes()


def test_missing_credentials_say_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(RuntimeError, match="set KUBECONFIG to a kubeconfig file"):
        asyncio.run(load_credentials(str(tmp_path / "absent")))


def test_token_file_and_exec_users_rotate(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": {"server": "https://127.0.0.1:6443",
                                      "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": "u", "user": {"tokenFile": "token"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "n1"}}],
        "current-context": "x",
    }  # fmt: skip
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    credentials = asyncio.run(load_credentials(str(path)))
    assert credentials.rotates and credentials.namespace == "n1"
    assert credentials.token == "first"
    token.write_text("second\n")
    asyncio.run(credentials.refresh())
    assert credentials.token == "second"


@pytest.mark.parametrize(("proxy", "trusted"), [(None, False), ("http://proxy:3128", True)])
def test_the_environment_is_read_only_when_a_proxy_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proxy: str | None, trusted: bool
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    if proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443', "
        "insecure-skip-tls-verify: true}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
    )

    async def trust_env() -> bool:
        client = await KubeClient.connect(str(path))
        try:
            return bool(client.api.rest_client.pool_manager.trust_env)
        finally:
            await client.close()

    assert asyncio.run(trust_env()) is trusted
