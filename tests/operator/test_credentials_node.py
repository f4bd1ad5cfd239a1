"""The operator's credential objects against the real cache server and client.

The files are what kubelet would mount from the Secrets and the keys ConfigMap the
operator builds (stringData and data, written as files), the server reads the config keys
the operator renders, and the client reads the directory the vLLM pods get: a real server
process lets the cluster's client in, refuses a stranger, accepts a rotation's old and
new keys while clients.pub lists both, and asks for the token on its admin endpoint.
"""

from __future__ import annotations

import dataclasses
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from lmcache_node.client.errors import NodeAuthenticationError
from lmcache_node.client.node_client import NodeClient
from lmcache_node.protocol.credentials import ClientCredentials
from lmcache_node.server.process import ServerProcess, free_port
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.builders.credentials import (
    ACTIVE,
    CLIENT_DIR,
    CREDENTIALS_DIR,
    KEYS_DIR,
    RETIRING,
    ClientKey,
    ClientMaterial,
    KeyState,
    ServerMaterial,
    build_cache_secret,
    build_client_secret,
    build_keys_configmap,
    client_secret_data,
)
from lmcache_operator.builders.lmcachecluster import node_config
from lmcache_operator.controllers.credentials import curve_keypair

pytestmark = pytest.mark.slow


def _material() -> tuple[ServerMaterial, ClientMaterial]:
    server_public, server_secret = curve_keypair()
    client_public, client_secret = curve_keypair()
    server = ServerMaterial(server_secret, server_public, "t" * 43, "ab" * 32)
    return server, ClientMaterial(client_secret, client_public)


def _mount(directory: Path, data: dict[str, str]) -> Path:
    """A Secret or ConfigMap volume: one file per key."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in data.items():
        (directory / name).write_text(text)
    return directory


def _keys(state: KeyState, root: Path) -> None:
    configmap = build_keys_configmap("c1", "ns", state.server_public, state.public_keys().allowed)
    _mount(root / KEYS_DIR.lstrip("/"), configmap["data"])


def _server_config(root: Path) -> Path:
    """The operator's node config with the mount paths under ``root`` (as a pod sees them)."""
    spec = LMCacheClusterSpec.model_validate(
        {"device": "cpu", "cache": {"cpuSize": "64Mi", "remote": {"url": "redis://127.0.0.1:1/0"}}}
    )
    config: dict[str, Any] = node_config("c1", "ns", spec)
    for key in ("curve_server_key", "curve_client_keys", "http_token_file", "remote_secret_file"):
        assert str(config[key]).startswith(
            ("/var/run/lmcache/credentials/", "/var/run/lmcache/keys/")
        )
        config[key] = str(root / str(config[key]).lstrip("/"))
    # a free events port: the rendered one (the pod's, 5556) may be taken on this host
    config.update(shm_dir=str(root / "shm"), shm_group=None, chunk_size=64, events_port=free_port())
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _connects(endpoint: str, credentials: ClientCredentials) -> bool:
    with NodeClient(endpoint, timeout_s=3, credentials=credentials) as client:
        try:
            client.connect()
        except NodeAuthenticationError:
            return False
    return True


def _connects_within(endpoint: str, credentials: ClientCredentials, want: bool) -> bool:
    """Whether the server's answer became ``want`` within 15 s (it re-reads clients.pub)."""
    deadline = time.monotonic() + 15
    while _connects(endpoint, credentials) != want:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_the_servers_and_clients_take_the_operators_credentials(tmp_path: Path) -> None:
    server, client = _material()
    _mount(
        tmp_path / CREDENTIALS_DIR.lstrip("/"),
        build_cache_secret("c1", "ns", server)["stringData"],
    )
    client_dir = _mount(
        tmp_path / CLIENT_DIR.lstrip("/"),
        build_client_secret("c1", "ns", client, server.server_public)["stringData"],
    )
    state = KeyState(server.server_public, (ClientKey(client.client_public, ACTIVE, "t0"),), "")
    _keys(state, tmp_path)
    config = _server_config(tmp_path)
    with ServerProcess("--config", str(config), log_file=tmp_path / "server.log") as proc:
        ours = ClientCredentials.from_directory(client_dir)
        assert _connects(proc.endpoint, ours)
        stranger_public, stranger_secret = curve_keypair()
        stranger = dataclasses.replace(
            ours, public_key=stranger_public.encode(), secret_key=stranger_secret.encode()
        )
        assert not _connects(proc.endpoint, stranger)

        # the admin endpoint wants the token from the cache Secret
        with pytest.raises(urllib.error.HTTPError) as refused:
            proc.clear_cache()
        assert refused.value.code == 401
        assert proc.clear_cache(token=server.http_token) == 0

        # a rotation as the operator does it: the client Secret patched, clients.pub lists
        # the retiring and the new key, then the new one alone; the server is not restarted
        new_public, new_secret = curve_keypair()
        _mount(client_dir, client_secret_data(ClientMaterial(new_secret, new_public)))
        rotated = ClientCredentials.from_directory(client_dir)
        assert rotated.public_key == new_public.encode()
        assert rotated.server_public_key == server.server_public.encode()  # server.pub kept
        both = (
            ClientKey(client.client_public, RETIRING, "t0"),
            ClientKey(new_public, ACTIVE, "t1"),
        )
        _keys(dataclasses.replace(state, client_keys=both), tmp_path)
        assert _connects_within(proc.endpoint, rotated, True)
        assert _connects(proc.endpoint, ours)
        _keys(dataclasses.replace(state, client_keys=both[1:]), tmp_path)
        assert _connects_within(proc.endpoint, ours, False)
        assert _connects(proc.endpoint, rotated)
