"""Tokens that rotate, against the real API server: a kubeconfig tokenFile and an exec plugin.

Each token is bound to a Secret; deleting the Secret makes the API server refuse the token
(401), as an expired projected token would be. The client must read the new one and go on.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from lmcache_operator.kube import KubeClient, KubeError

from tests.operator.kubectl import Cluster
from tests.support import wait_until

pytestmark = pytest.mark.k8s

EXEC_PLUGIN = """\
import json, pathlib, sys
token = pathlib.Path(sys.argv[1]).read_text().strip()
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {"token": token}}))
"""


def _reader(k8s: Cluster, namespace: str) -> None:
    """A ServiceAccount that may list ConfigMaps in the namespace (and nothing else)."""
    k8s.kubectl("create", "serviceaccount", "rotator", "-n", namespace)
    k8s.kubectl(
        "create", "role", "cm-reader", "--verb=list", "--resource=configmaps", "-n", namespace
    )
    k8s.kubectl(
        "create", "rolebinding", "cm-reader", "--role=cm-reader",
        f"--serviceaccount={namespace}:rotator", "-n", namespace,
    )  # fmt: skip


def _token(k8s: Cluster, namespace: str, secret: str) -> str:
    k8s.kubectl("create", "secret", "generic", secret, "-n", namespace)
    return k8s.kubectl(
        "create", "token", "rotator", "-n", namespace,
        "--bound-object-kind=Secret", f"--bound-object-name={secret}",
    ).stdout.strip()  # fmt: skip


def _kubeconfig(k8s: Cluster, path: Path, user: dict[str, Any]) -> None:
    admin = yaml.safe_load(k8s.kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "rotator", "user": user}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "rotator"}}],
                "current-context": "x",
            }
        )
    )


def _revoke(k8s: Cluster, namespace: str, secret: str, token: str, tmp_path: Path) -> None:
    """Delete the token's Secret and wait until the API server refuses the token (it caches
    successful token reviews for a few seconds)."""
    k8s.kubectl("delete", "secret", secret, "-n", namespace)
    probe = tmp_path / f"probe-{secret}.kubeconfig"
    _kubeconfig(k8s, probe, {"token": token})

    def refused() -> bool:
        result = k8s.kubectl(
            "--kubeconfig", str(probe), "get", "configmaps", "-n", namespace, check=False
        )
        return "Unauthorized" in result.stderr or "must be logged in" in result.stderr

    wait_until(refused, 60, f"the token bound to {secret} refused", interval=0.5)


async def _list_twice(kubeconfig: Path, rotate: Any, namespace: str) -> tuple[list[str], list[str]]:
    client = await KubeClient.connect(str(kubeconfig))
    try:
        first = await client.list("v1", "ConfigMap", namespace)
        rotate()
        second = await client.list("v1", "ConfigMap", namespace)
    finally:
        await client.close()
    names = [[i["metadata"]["name"] for i in listing["items"]] for listing in (first, second)]
    return names[0], names[1]


@pytest.mark.parametrize("source", ["tokenFile", "exec"])
def test_a_rotated_token_is_picked_up_after_the_old_one_is_refused(
    k8s_cluster: Cluster, namespace: str, tmp_path: Path, source: str
) -> None:
    _reader(k8s_cluster, namespace)
    token_file = tmp_path / "token"
    first = _token(k8s_cluster, namespace, "bound-1")
    token_file.write_text(first + "\n")
    second = _token(k8s_cluster, namespace, "bound-2")
    if source == "tokenFile":
        user: dict[str, Any] = {"tokenFile": str(token_file)}
    else:
        plugin = tmp_path / "plugin.py"
        plugin.write_text(EXEC_PLUGIN)
        user = {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": sys.executable,
                "args": [str(plugin), str(token_file)],
                "interactiveMode": "Never",
            }
        }
    kubeconfig = tmp_path / "kubeconfig"
    _kubeconfig(k8s_cluster, kubeconfig, user)

    def rotate() -> None:
        _revoke(k8s_cluster, namespace, "bound-1", first, tmp_path)
        token_file.write_text(second + "\n")

    before, after = asyncio.run(_list_twice(kubeconfig, rotate, namespace))
    assert before == after == ["kube-root-ca.crt"]  # the namespace's own ConfigMap


def test_a_refused_token_without_a_new_one_is_an_error(
    k8s_cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    _reader(k8s_cluster, namespace)
    token_file = tmp_path / "token"
    only = _token(k8s_cluster, namespace, "only")
    token_file.write_text(only + "\n")
    kubeconfig = tmp_path / "kubeconfig"
    _kubeconfig(k8s_cluster, kubeconfig, {"tokenFile": str(token_file)})

    def revoke() -> None:
        _revoke(k8s_cluster, namespace, "only", only, tmp_path)

    with pytest.raises(KubeError) as raised:
        asyncio.run(_list_twice(kubeconfig, revoke, namespace))
    assert raised.value.status == 401


def test_in_cluster_login_by_service_host_follows_the_rotated_token(
    k8s_cluster: Cluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a pod sees: $KUBERNETES_SERVICE_HOST/PORT and the ServiceAccount directory
    (token, ca.crt, namespace) that kubelet rotates; no kubeconfig, no cluster DNS."""
    _reader(k8s_cluster, namespace)
    admin = yaml.safe_load(k8s_cluster.kubeconfig.read_text())["clusters"][0]["cluster"]
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    if "certificate-authority-data" in admin:
        (sa_dir / "ca.crt").write_bytes(base64.b64decode(admin["certificate-authority-data"]))
    else:
        (sa_dir / "ca.crt").write_bytes(Path(admin["certificate-authority"]).read_bytes())
    (sa_dir / "namespace").write_text(namespace)
    first = _token(k8s_cluster, namespace, "pod-1")
    second = _token(k8s_cluster, namespace, "pod-2")
    (sa_dir / "token").write_text(first)
    server = urlsplit(admin["server"])
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", str(server.hostname))
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))

    def rotate() -> None:
        _revoke(k8s_cluster, namespace, "pod-1", first, tmp_path)
        (sa_dir / "token").write_text(second)

    async def run() -> tuple[list[str], list[str], str | None]:
        client = await KubeClient.connect(sa_dir=sa_dir)
        try:
            assert client.credentials.namespace == namespace
            before = await client.list("v1", "ConfigMap", namespace)
            rotate()
            after = await client.list("v1", "ConfigMap", namespace)
        finally:
            await client.close()
        names = [[i["metadata"]["name"] for i in x["items"]] for x in (before, after)]
        return names[0], names[1], client.credentials.token

    before, after, token = asyncio.run(run())
    assert before == after == ["kube-root-ca.crt"]
    assert token == second
