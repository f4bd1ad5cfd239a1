"""``lmcache.node.credentials_dir``: the connector's client speaks CURVE with those keys."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import zmq
from lmcache_node.client import NodeClientError
from lmcache_node.protocol.credentials import generate_keypair
from lmcache_node.server.process import free_port
from lmcache_node.vllm.link import default_client
from lmcache_node.vllm.settings import ConnectorConfigError, load_settings
from zmq.auth.thread import ThreadAuthenticator


class SeenKeys:
    """A ZAP credentials provider that lets every client in and records its public key."""

    def __init__(self) -> None:
        self.keys: list[bytes] = []

    def callback(self, domain: str, key: bytes) -> bool:
        self.keys.append(bytes(key))
        return True


def write_credentials(directory: Path, server_public: bytes) -> bytes:
    public, secret = generate_keypair()
    directory.mkdir(exist_ok=True)
    (directory / "client.key").write_bytes(secret + b"\n")
    (directory / "client.pub").write_bytes(public + b"\n")
    (directory / "server.pub").write_bytes(server_public + b"\n")
    return public


def test_the_client_authenticates_with_the_directory_keys(tmp_path: Path) -> None:
    server_public, server_secret = generate_keypair()
    client_public = write_credentials(tmp_path / "creds", server_public)
    port = free_port()
    settings = load_settings(
        {"lmcache.node.port": port, "lmcache.node.timeout_s": 2.0,
         "lmcache.node.credentials_dir": str(tmp_path / "creds")},
        env={},
    )  # fmt: skip
    context = zmq.Context()
    seen = SeenKeys()
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=seen)
    router = context.socket(zmq.ROUTER)
    router.curve_secretkey = server_secret
    router.curve_publickey = server_public
    router.curve_server = True
    router.bind(f"tcp://127.0.0.1:{port}")
    client = default_client(settings, settings.client_credentials())
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            client.connect()  # nobody answers the handshake: it times out
        except NodeClientError as exc:
            errors.append(exc)

    thread = threading.Thread(target=connect)
    thread.start()
    try:
        assert router.poll(10_000), "no handshake arrived over CURVE"
        frames = router.recv_multipart()
        assert len(frames) >= 2  # the client's identity, then its request
        assert seen.keys and set(seen.keys) == {client_public}
    finally:
        thread.join(30)
        client.close()
        router.close(linger=0)
        auth.stop()
        context.term()
    assert errors  # the handshake got no reply, as arranged


def test_a_client_public_key_of_another_pair_is_refused(tmp_path: Path) -> None:
    server_public, _ = generate_keypair()
    write_credentials(tmp_path, server_public)
    other_public, _ = generate_keypair()
    (tmp_path / "client.pub").write_bytes(other_public)
    with pytest.raises(ConnectorConfigError) as info:
        load_settings({}, env={"LMCACHE_NODE_CREDENTIALS_DIR": str(tmp_path)})
    message = str(info.value)
    assert "does not match client.key" in message
    assert "(set by environment variable LMCACHE_NODE_CREDENTIALS_DIR)" in message
