"""The HTTP API's trust model on real server processes: admin endpoints need the bearer token
(or a loopback peer when none is configured), the open endpoints hold no ids, bodies are
capped, and the API binds loopback and the node's address, not every interface."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lmcache_node.client import NodeClient
from lmcache_node.server.process import ServerProcess

from tests.support import wait_until

pytestmark = pytest.mark.integration  # real server processes / subprocesses

TOKEN = "t0ken-" + "x" * 26


def request(
    method: str, url: str, body: bytes | None = None, token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def outside_address() -> str:
    """A non-loopback IPv4 address of this machine: a client connecting to it from here
    arrives from that address, so the server sees a network peer, not loopback."""
    try:
        out = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "scope", "global"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout  # fmt: skip
    except OSError:
        out = ""
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    pytest.skip("this machine has no non-loopback IPv4 address to test network peers with")


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def store_two_chunks(node: NodeClient) -> list[bytes]:
    reg = node.register_kv_caches([torch.randn(8, 2, 16, 16)], block_dim=0, block_size=16)
    keys = [os.urandom(16) for _ in range(2)]
    assert node.store(reg, keys, list(range(8))) == 2
    return keys


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """A server whose admin endpoints need TOKEN, on loopback and this machine's address."""
    workdir = tmp_path_factory.mktemp("guarded")
    token_file = workdir / "http.token"
    token_file.write_text(TOKEN + "\n")
    proc = ServerProcess(
        "--chunk-size", "64", "--cpu-buffer-size", "0.02", "--l1-page-size", "4096",
        "--http-token-file", str(token_file), "--http-host", f"127.0.0.1,{outside_address()}",
        log_file=workdir / "server.log",
    )  # fmt: skip
    with proc:
        yield proc, token_file


def test_cache_clear_needs_the_token(guarded: tuple[ServerProcess, Path]) -> None:
    server, _ = guarded
    url = server.http_url + "/cache/clear"
    with NodeClient(server.endpoint, timeout_s=10) as node:
        node.connect()
        keys = store_two_chunks(node)
        status, headers, body = request("POST", url)
        assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="lmcache-node"'
        assert b"Authorization: Bearer" in body
        status, headers, _ = request("POST", url, token="wrong")
        assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
        assert request("POST", url, token=TOKEN + "x")[0] == 401
        assert node.lookup(keys)[0] == 2  # refused: the cache still holds its chunks
        status, _, body = request("POST", url, token=TOKEN)
        assert status == 200 and json.loads(body)["cleared"] >= 2
        assert node.lookup(keys)[0] == 0


def test_loglevel_needs_the_token(guarded: tuple[ServerProcess, Path]) -> None:
    server, _ = guarded
    url = server.http_url + "/loglevel"
    assert request("PUT", url, b"DEBUG")[0] == 401
    assert request("PUT", url, b"DEBUG", token="nope")[0] == 401
    assert "log level set to DEBUG" not in server.log_tail(100_000)
    status, _, body = request("PUT", url, b"DEBUG", token=TOKEN)
    assert status == 200 and json.loads(body) == {"level": "DEBUG"}
    assert request("PUT", url, b"INFO", token=TOKEN)[0] == 200
    assert "log level set to DEBUG" in server.log_tail(100_000)


def test_token_from_the_network_and_rotation(guarded: tuple[ServerProcess, Path]) -> None:
    server, token_file = guarded
    url = f"http://{outside_address()}:{server.http_port}/loglevel"
    assert request("PUT", url, b"INFO")[0] == 401
    assert request("PUT", url, b"INFO", token=TOKEN)[0] == 200
    rotated = TOKEN[::-1]
    token_file.write_text(rotated + "\n")  # a Secret volume updates in place
    wait_until(
        lambda: request("PUT", url, b"INFO", token=rotated)[0] == 200,
        20,
        "the rotated token to be accepted",
        interval=0.2,
    )
    assert request("PUT", url, b"INFO", token=TOKEN)[0] == 401
    token_file.write_text("")  # a broken update keeps the last good token

    def kept_after_reread() -> bool:
        assert request("PUT", url, b"INFO", token=rotated)[0] == 200  # at every poll
        return "kept the previous HTTP API token" in server.log_tail(20000)

    wait_until(kept_after_reread, 20, "the server to re-read the emptied token file")
    token_file.write_text(TOKEN + "\n")


def test_without_a_token_admin_answers_loopback_only(tmp_path: Path) -> None:
    outside = outside_address()
    proc = ServerProcess(
        "--chunk-size", "64", "--cpu-buffer-size", "0.02", "--l1-page-size", "4096",
        "--http-host", f"127.0.0.1,{outside}", log_file=tmp_path / "server.log",
    )  # fmt: skip
    with proc, NodeClient(proc.endpoint, timeout_s=10) as node:
        node.connect()
        keys = store_two_chunks(node)
        remote = f"http://{outside}:{proc.http_port}"
        assert request("GET", remote + "/healthz")[0] == 200  # reachable from the network
        status, _, body = request("POST", remote + "/cache/clear")
        assert status == 403 and b"http_token_file" in body
        assert request("PUT", remote + "/loglevel", b"DEBUG")[0] == 403
        assert node.lookup(keys)[0] == 2
        status, _, body = request("POST", proc.http_url + "/cache/clear")  # loopback
        assert status == 200 and json.loads(body)["cleared"] >= 2


def test_http_binds_loopback_and_the_host_address_only(tmp_path: Path) -> None:
    outside = outside_address()
    wildcard_zmq = ServerProcess(  # ZMQ on every interface must not widen the HTTP API
        "--cpu-buffer-size", "0.01", "--host", "0.0.0.0", "--insecure-allow-unauthenticated",
        log_file=tmp_path / "wild.log",
    )  # fmt: skip
    with wildcard_zmq:
        assert reachable("127.0.0.1", wildcard_zmq.http_port)
        assert not reachable(outside, wildcard_zmq.http_port)
    concrete = ServerProcess(
        "--cpu-buffer-size", "0.01", "--host", outside, "--insecure-allow-unauthenticated",
        log_file=tmp_path / "concrete.log",
    )  # fmt: skip
    with concrete:
        assert reachable("127.0.0.1", concrete.http_port)
        assert reachable(outside, concrete.http_port)
    explicit = ServerProcess(
        "--cpu-buffer-size", "0.01", "--http-host", "0.0.0.0", log_file=tmp_path / "all.log"
    )
    with explicit:
        assert reachable(outside, explicit.http_port)


def leaves_and_keys(value: Any, keys: set[str], leaves: list[Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            keys.add(str(key))
            leaves_and_keys(item, keys, leaves)
    elif isinstance(value, list):
        for item in value:
            leaves_and_keys(item, keys, leaves)
    else:
        leaves.append(value)


ID_FIELDS = {"registration_id", "session_id", "routing_id", "client", "pid", "hostname", "key"}


def test_open_endpoints_hold_no_ids_of_live_sessions(server: ServerProcess) -> None:
    with NodeClient(server.endpoint, timeout_s=10) as node:
        node.connect()
        store_two_chunks(node)
        session_id = node._conn.routing_id.hex()
        stats_http = json.loads(request("GET", server.http_url + "/stats")[2])
        for stats in (stats_http, node.stats()):  # /stats and the ZMQ STATS op
            keys: set[str] = set()
            leaves: list[Any] = []
            leaves_and_keys(stats, keys, leaves)
            assert not keys & ID_FIELDS, keys & ID_FIELDS
            assert not any(session_id in str(leaf) for leaf in leaves)
            assert stats["sessions"] >= 1 and stats["registered_workers"] >= 1
            assert stats["registrations"]["by_transfer_mode"]
        for path in ("/stats", "/metrics", "/readyz", "/healthz", "/config"):
            status, _, body = request("GET", server.http_url + path)
            assert status == 200 and session_id.encode() not in body, path
            assert b"registration_id" not in body, path


def test_body_over_the_cap_gets_413(guarded: tuple[ServerProcess, Path]) -> None:
    server, _ = guarded  # the default cap, http_max_body_bytes = 65536
    url = server.http_url + "/loglevel"
    status, _, body = request("PUT", url, b"D" * 100_000, token=TOKEN)
    assert status == 413 and b"http_max_body_bytes" in body
    assert request("PUT", url, b"D" * 100_000)[0] == 413  # before anything else
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    chunks = iter([b"D" * 20_000] * 5)  # chunked: no length announced
    headers = {"Authorization": f"Bearer {TOKEN}"}
    connection.request("PUT", "/loglevel", body=chunks, headers=headers, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and b"http_max_body_bytes" in response.read()
    connection.close()
    assert request("PUT", url, b"INFO", token=TOKEN)[0] == 200


@pytest.mark.parametrize("content", [None, "\n"])
def test_unusable_token_file_refuses_to_start(tmp_path: Path, content: str | None) -> None:
    token_file = tmp_path / "http.token"
    if content is not None:
        token_file.write_text(content)
    log = tmp_path / "s.log"
    proc = ServerProcess(
        "--cpu-buffer-size", "0.01", "--http-token-file", str(token_file), log_file=log
    )
    try:
        with pytest.raises(RuntimeError, match="exited with 2"):
            proc.start()
    finally:
        proc.kill()  # a server that wrongly started must not outlive the test
    text = log.read_text()
    assert "http_token_file" in text and str(token_file) in text


def test_config_shows_paths_but_no_secrets(tmp_path: Path) -> None:
    secret = tmp_path / "remote.key"
    secret.write_text("remote-secret-value-0123456789\n")
    token = tmp_path / "http.token"
    token.write_text("http-token-value-0123456789\n")
    proc = ServerProcess(
        "--cpu-buffer-size", "0.01", "--remote-secret-file", str(secret),
        "--http-token-file", str(token), log_file=tmp_path / "s.log",
        env={"LMCACHE_REMOTE_URL": "redis://user:hunter2@127.0.0.1:1/0?password=hunter3"},
    )  # fmt: skip
    with proc:
        status, _, body = request("GET", proc.http_url + "/config")
    config = json.loads(body)
    assert status == 200
    assert config["remote_secret_file"] == str(secret) and config["http_token_file"] == str(token)
    for hidden in (b"hunter2", b"hunter3", b"remote-secret-value", b"http-token-value"):
        assert hidden not in body, hidden
    assert config["remote_url"] == "redis://user:***@127.0.0.1:1/0?password=***"
