"""Handshake checks, locks, sessions, timeouts and reconnecting after a server restart."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from lmcache_node.client import (
    IncompatibleServerError,
    NodeClient,
    NodeClientError,
    NodeTimeoutError,
    NodeUnavailableError,
    RemoteError,
)
from lmcache_node.keys import HASH_ALGORITHM
from lmcache_node.protocol import messages as m
from lmcache_node.server.process import ServerProcess, free_port

from tests.support import continue_process, stop_process, wait_until

pytestmark = pytest.mark.integration  # real server processes / subprocesses


def layers() -> list[torch.Tensor]:
    return [torch.randn(16, 2, 16, 16, dtype=torch.float16) for _ in range(2)]


def test_handshake_reports_the_server(client: NodeClient) -> None:
    info = client.info
    assert info is not None
    assert info.chunk_size == 64
    assert info.protocol_version == m.PROTOCOL_VERSION
    assert info.hash_algorithm == HASH_ALGORITHM == "blake2b-128-chain-v1"
    assert set(info.transfer_modes) == {"shared", "engine"}
    assert info.device == "cpu"


def test_wrong_chunk_size_fails_at_connect(server: ServerProcess) -> None:
    node = NodeClient(server.endpoint, timeout_s=5, expected_chunk_size=256)
    with node, pytest.raises(IncompatibleServerError, match="chunk size"):
        node.connect()


def test_block_size_must_divide_chunk_size(client: NodeClient) -> None:
    with pytest.raises(IncompatibleServerError, match="multiple of the block size"):
        client.register_kv_caches(layers(), block_dim=0, block_size=24)


def test_bad_block_dim_is_a_clear_registration_error(client: NodeClient) -> None:
    tensors = [torch.zeros(16, 2, 16, 16).transpose(1, 2)]  # non-contiguous inner dims
    with pytest.raises(RemoteError) as info:
        client.register_kv_caches(tensors, block_dim=0, block_size=16)
    assert info.value.code == "registration_failed"
    assert "contiguous" in info.value.message


def test_out_of_range_blocks_and_unknown_registration(client: NodeClient) -> None:
    reg = client.register_kv_caches(layers(), block_dim=0, block_size=16)
    key = os.urandom(16)
    with pytest.raises(RemoteError) as info:
        client.store(reg, [key], [0, 1, 2, 16])
    assert info.value.code == "out_of_range"
    assert client.lookup([key]) == (0, None)  # nothing half-stored
    client.unregister(reg)
    with pytest.raises(RemoteError) as info:
        client.store(reg, [key], [0, 1, 2, 3])
    assert info.value.code == "not_registered"
    assert client.ping() > 0  # the server is fine


def test_lookup_lock_protects_and_free_lock_releases(client: NodeClient) -> None:
    reg = client.register_kv_caches(layers(), block_dim=0, block_size=16)
    keys = [os.urandom(16) for _ in range(2)]
    assert client.store(reg, keys, list(range(8))) == 2
    hits, lock_id = client.lookup(keys, lock=True, lock_ttl_s=30)
    assert hits == 2 and lock_id is not None
    assert client.stats()["active_locks"] == 1
    assert client.free_lock(lock_id) == 1
    assert client.free_lock(lock_id) == 0
    assert client.stats()["active_locks"] == 0


def test_lock_expires_after_its_ttl(client: NodeClient) -> None:
    reg = client.register_kv_caches(layers(), block_dim=0, block_size=16)
    key = os.urandom(16)
    client.store(reg, [key], [0, 1, 2, 3])
    _, lock_id = client.lookup([key], lock=True, lock_ttl_s=0.2)
    assert lock_id is not None
    wait_until(lambda: client.stats()["active_locks"] == 0, 10, "the lock to expire")


def test_end_session_releases_locks_and_registrations(client: NodeClient) -> None:
    reg = client.register_kv_caches(layers(), block_dim=0, block_size=16)
    key = os.urandom(16)
    client.store(reg, [key], [0, 1, 2, 3])
    client.lookup([key], lock=True)
    assert client.end_session() == (1, 1)
    stats = client.stats()
    assert stats["active_locks"] == 0
    assert stats["registered_workers"] == 0
    assert client.lookup([key]) == (1, None)  # the data stays cached


def test_invalid_keys_are_rejected(client: NodeClient) -> None:
    with pytest.raises(RemoteError) as info:
        client.lookup([b"short"])
    assert info.value.code == "bad_request"


def test_unreachable_server_fails_within_the_timeout() -> None:
    node = NodeClient(f"tcp://127.0.0.1:{free_port()}", timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(NodeUnavailableError, match="cannot reach"):
        node.connect()
    assert time.monotonic() - start < 10
    with pytest.raises(NodeUnavailableError):
        node.lookup([os.urandom(16)])
    node.close()
    with pytest.raises(NodeClientError):
        node.ping()


def test_stopped_server_gives_timeout_not_hang(tmp_path: Path) -> None:
    proc = ServerProcess(
        "--chunk-size", "64", "--cpu-buffer-size", "0.05", log_file=tmp_path / "s.log"
    )
    with proc:
        node = NodeClient(proc.endpoint, timeout_s=1.0, expected_chunk_size=64)
        node.connect()
        assert proc.proc is not None
        stop_process(proc.proc.pid)  # connected but silent
        try:
            with pytest.raises(NodeTimeoutError):
                node.lookup([os.urandom(16)])
            with pytest.raises(NodeUnavailableError):  # fails fast while it is unavailable
                node.lookup([os.urandom(16)])
        finally:
            continue_process(proc.proc.pid)
        wait_until(lambda: node.available, 20, "the client to recover after SIGCONT")
        assert node.lookup([os.urandom(16)]) == (0, None)
        node.close()


def test_reconnects_and_reregisters_after_server_restart(tmp_path: Path) -> None:
    port, http_port = free_port(), free_port()
    shm_dir = Path("/dev/shm") / f"lmcache-test-restart-{os.getpid()}-{time.monotonic_ns()}"
    args = ("--chunk-size", "64", "--cpu-buffer-size", "0.05", "--shm-dir", str(shm_dir))
    first = ServerProcess(*args, port=port, http_port=http_port, log_file=tmp_path / "a.log")
    first.start()
    node = NodeClient(first.endpoint, timeout_s=5.0, expected_chunk_size=64)
    try:
        node.connect()
        tensors = layers()
        originals = [t.clone() for t in tensors]
        reg = node.register_kv_caches(tensors, block_dim=0, block_size=16)
        keys = [os.urandom(16)]
        assert node.store(reg, keys, [0, 1, 2, 3]) == 1
        first.kill()  # crash, not a graceful stop
        wait_until(lambda: not node.available, 10, "the client to notice the crash")
        start = time.monotonic()
        with pytest.raises(NodeUnavailableError):
            node.store(reg, keys, [0, 1, 2, 3])
        assert time.monotonic() - start < 1.0  # fails fast during the outage
        second = ServerProcess(*args, port=port, http_port=http_port, log_file=tmp_path / "b.log")
        with second:
            wait_until(lambda: node.available, 30, "the client back on the new server")
            assert node.lookup(keys) == (1, None)  # adopted from the L1 pool the crash left
            assert node.store(reg, keys, [0, 1, 2, 3]) == 1  # same Registration object
            assert node.retrieve(reg, keys, [8, 9, 10, 11]) == 1
            for tensor, original in zip(tensors, originals, strict=True):
                assert torch.equal(tensor[8:12], original[0:4])
            assert "re-registered" not in second.log_tail()  # (client-side log line)
            assert "Registered KV cache for worker 0" in second.log_tail()
    finally:
        node.close()
        first.kill()
        shutil.rmtree(shm_dir, ignore_errors=True)
