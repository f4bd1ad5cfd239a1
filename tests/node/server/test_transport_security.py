"""The request port as an attacker on the network sees it (docs/security.md, "other pods").

Real server processes with CURVE keys from ``lmcache-node keys generate``: a client
without the cluster's key gets nothing, a non-loopback bind without credentials does not
start, and a session's routing id, locks and registrations are of no use to anyone else.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from lmcache_node.client.errors import NodeAuthenticationError, RemoteError
from lmcache_node.client.node_client import NodeClient
from lmcache_node.keygen import ALLOWED_CLIENTS_FILE, SERVER_SECRET_FILE, generate
from lmcache_node.protocol import messages as m
from lmcache_node.protocol.codec import decode_payload, encode_request
from lmcache_node.protocol.credentials import ClientCredentials, generate_keypair
from lmcache_node.server.process import ServerProcess, free_port

from tests.node.server.wire import curve_dealer, exchange, maybe_exchange
from tests.support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def make_keys(directory: Path) -> Path:
    """The cluster's keys, plus a second allowed client key in ``keys/other``: another
    worker the server lets in (the attacker of the routing-id test)."""
    generate(directory)
    other = directory / "other"
    generate(other)
    (other / "server.pub").write_text((directory / "server.pub").read_text())
    with open(directory / ALLOWED_CLIENTS_FILE, "a") as allowed:
        allowed.write((other / "client.pub").read_text())
    return directory


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keys(tmp_path_factory.mktemp("keys") / "keys")


def curve_args(keys: Path) -> tuple[str, ...]:
    return (
        "--curve-server-key", str(keys / SERVER_SECRET_FILE),
        "--curve-client-keys", str(keys / ALLOWED_CLIENTS_FILE),
    )  # fmt: skip


def curve_server_process(keys: Path, log: Path) -> ServerProcess:
    return ServerProcess(
        *curve_args(keys), "--chunk-size", "64", "--cpu-buffer-size", "0.05",
        "--heartbeat-timeout-secs", "30", log_file=log,
    )  # fmt: skip


@pytest.fixture(scope="module")
def curve_server(keys: Path) -> Iterator[ServerProcess]:
    with curve_server_process(keys, keys.parent / "server.log") as proc:
        yield proc


def run_serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcache_node.server", "--port", str(free_port()),
         "--http-port", "0", "--cpu-buffer-size", "0.05", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_a_non_loopback_bind_without_credentials_does_not_start() -> None:
    result = run_serve("--host", "0.0.0.0")
    assert result.returncode == 2
    for flag in ("--curve-server-key", "--curve-client-keys", "--insecure-allow-unauthenticated"):
        assert flag in result.stderr
    assert "without credentials" in result.stderr


def test_half_a_curve_configuration_is_refused(keys: Path) -> None:
    result = run_serve("--host", "0.0.0.0", "--curve-server-key", str(keys / SERVER_SECRET_FILE))
    assert result.returncode == 2
    assert "--curve-client-keys is missing" in result.stderr


def test_a_malformed_key_file_is_refused_naming_the_file(tmp_path: Path, keys: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    result = run_serve(
        "--curve-server-key", str(bad), "--curve-client-keys", str(keys / ALLOWED_CLIENTS_FILE)
    )
    assert result.returncode == 2
    assert str(bad) in result.stderr and "40 Z85 characters" in result.stderr


def test_the_insecure_escape_hatch_starts_and_warns(tmp_path: Path) -> None:
    log = tmp_path / "insecure.log"
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmcache_node.server", "--host", "0.0.0.0", "--port",
             str(port), "--http-port", "0", "--cpu-buffer-size", "0.05",
             "--insecure-allow-unauthenticated"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def listening() -> bool:
            assert proc.poll() is None, log.read_text()
            return "listening on" in log.read_text()

        wait_until(listening, 60, "the insecure server to listen")
        text = log.read_text()
        assert "WITHOUT AUTHENTICATION" in text
        assert "UNAUTHENTICATED (insecure)" in text
    finally:
        proc.terminate()
        proc.wait(30)


def test_only_allowed_client_keys_get_a_session(curve_server: ServerProcess, keys: Path) -> None:
    good = ClientCredentials.from_directory(keys)
    with NodeClient(curve_server.endpoint, timeout_s=5, credentials=good) as client:
        assert client.connect().chunk_size == 64
        assert client.lookup([b"k" * 16]) == (0, None)

    public, secret = generate_keypair()
    stranger = dataclasses.replace(good, public_key=public, secret_key=secret)
    with (
        NodeClient(curve_server.endpoint, timeout_s=5, credentials=stranger) as client,
        pytest.raises(NodeAuthenticationError, match="refused this client's CURVE key"),
    ):
        client.connect()
    with (
        NodeClient(curve_server.endpoint, timeout_s=5) as client,
        pytest.raises(NodeAuthenticationError, match="requires CURVE credentials"),
    ):
        client.connect()


def test_a_plain_socket_gets_no_answer_at_all(curve_server: ServerProcess) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(curve_server.endpoint)
    try:
        reply = maybe_exchange(sock, encode_request(m.Op.HANDSHAKE, 1, m.HandshakeRequest("x")))
        assert reply is None
    finally:
        sock.close(0)


def test_client_keys_rotate_without_a_restart(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    with curve_server_process(keys, tmp_path / "server.log") as server:
        _rotate(server, keys)


def _rotate(curve_server: ServerProcess, keys: Path) -> None:
    old = ClientCredentials.from_directory(keys)
    public, secret = generate_keypair()
    new = dataclasses.replace(old, public_key=public, secret_key=secret)
    allowed = keys / ALLOWED_CLIENTS_FILE
    with (
        NodeClient(curve_server.endpoint, timeout_s=5, credentials=new) as client,
        pytest.raises(NodeAuthenticationError),
    ):
        client.connect()
    # the rotation: both keys allowed, then only the new one (re-read within ~1 s)
    allowed.write_text(f"{old.public_key.decode()} old\n{public.decode()} new\n")
    wait_until(lambda: _connects(curve_server.endpoint, new), 10, "the added key accepted")
    allowed.write_text(f"{public.decode()}\n")
    wait_until(lambda: not _connects(curve_server.endpoint, old), 10, "the removed key refused")


def _connects(endpoint: str, credentials: ClientCredentials) -> bool:
    """Whether a new client with ``credentials`` gets through the handshake."""
    with NodeClient(endpoint, timeout_s=2, credentials=credentials) as client:
        try:
            client.connect()
        except NodeAuthenticationError:
            return False
    return True


def test_a_stolen_routing_id_cannot_act_on_another_session(
    curve_server: ServerProcess, keys: Path
) -> None:
    victim_keys = ClientCredentials.from_directory(keys)
    attacker_keys = ClientCredentials.from_directory(keys / "other")  # allowed too
    routing_id = b"victim-routing-id"
    victim = curve_dealer(curve_server.endpoint, victim_keys, routing_id)
    header, _ = exchange(victim, encode_request(m.Op.HANDSHAKE, 1, m.HandshakeRequest("v")))
    assert header.status == m.Status.OK

    # While the victim is connected, nobody can take its routing id over (no handover).
    attacker = curve_dealer(curve_server.endpoint, attacker_keys, routing_id)
    assert maybe_exchange(attacker, encode_request(m.Op.PING, 2, m.PingRequest())) is None
    attacker.close(0)
    header, _ = exchange(victim, encode_request(m.Op.PING, 3, m.PingRequest()))
    assert header.status == m.Status.OK

    # Once the victim's connection is gone (its session lives on until the heartbeat
    # timeout), the id connects, but the session refuses the other identity.
    victim.close(0)
    sockets = []

    def ping_with_the_freed_id() -> tuple[m.Header, bytes] | None:
        sockets.append(curve_dealer(curve_server.endpoint, attacker_keys, routing_id))
        reply = maybe_exchange(sockets[-1], encode_request(m.Op.PING, 4, m.PingRequest()))
        if reply is None:
            sockets.pop().close(0)
        return reply

    header, body = wait_until(ping_with_the_freed_id, 20, "the freed routing id to connect")
    attacker = sockets[-1]
    assert header.status == m.Status.ERROR
    error = decode_payload(body, m.ErrorReply)
    assert error.code == m.ErrorCode.FORBIDDEN.value
    assert "another client identity" in error.message
    header, body = exchange(attacker, encode_request(m.Op.HANDSHAKE, 5, m.HandshakeRequest("a")))
    assert decode_payload(body, m.ErrorReply).code == m.ErrorCode.FORBIDDEN.value
    attacker.close(0)


def test_curve_clients_cannot_clear_the_cache(curve_server: ServerProcess, keys: Path) -> None:
    credentials = ClientCredentials.from_directory(keys)
    with NodeClient(curve_server.endpoint, timeout_s=5, credentials=credentials) as client:
        client.connect()
        with pytest.raises(RemoteError) as info:
            client.clear()
    assert info.value.code == m.ErrorCode.FORBIDDEN.value
    assert "/cache/clear" in info.value.message


def test_handshake_reply_names_the_limits(curve_server: ServerProcess, keys: Path) -> None:
    credentials = ClientCredentials.from_directory(keys)
    sock = curve_dealer(curve_server.endpoint, credentials, b"limits")
    try:
        header, body = exchange(sock, encode_request(m.Op.HANDSHAKE, 1, m.HandshakeRequest("t")))
        assert header.version == 2
        reply = decode_payload(body, m.HandshakeReply)
        assert reply.limits["max_lock_ttl_secs"] == 60
        assert reply.limits["max_keys_per_request"] == 8192
    finally:
        sock.close(0)
