"""The connector's worker path against a real node server (no vLLM needed): registration,
store, retrieve into other blocks, failures reported as blocks to recompute, reconnects."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from lmcache_node.keys import KeyNamespace
from lmcache_node.server.process import ServerProcess, free_port
from lmcache_node.vllm.link import NodeLink
from lmcache_node.vllm.planner import TransferOp
from lmcache_node.vllm.settings import load_settings
from lmcache_node.vllm.transfers import WorkerTransfers, register
from lmcache_node.vllm.verify import KVVerifier

from tests.support import wait_until

pytestmark = pytest.mark.integration  # real server processes / subprocesses

CHUNK, BLOCK, BLOCKS = 64, 16, 32  # 4 blocks per chunk
NS = KeyNamespace(model_name="tiny", kv_dtype="bfloat16", layout="test-cpu-blocks16")


def start_server(port: int, http_port: int, log: Path, *extra: str) -> ServerProcess:
    return ServerProcess(
        "--chunk-size", str(CHUNK), "--cpu-buffer-size", "0.05", "--l1-page-size", "4096",
        *extra, port=port, http_port=http_port, log_file=log,
    ).start()  # fmt: skip


def kv_caches(device: str = "cpu") -> list[torch.Tensor]:
    if device == "cuda":  # vLLM's flash-attention layout: [2, blocks, block_size, heads, head]
        shape = (2, BLOCKS, BLOCK, 2, 8)
        return [torch.zeros(shape, dtype=torch.bfloat16, device=device) for _ in range(2)]
    # vLLM's CPU layout: [num_blocks, num_kv_heads, block_size, 2 * head_dim]
    return [torch.zeros(BLOCKS, 2, BLOCK, 16, dtype=torch.bfloat16) for _ in range(2)]


class Worker:
    def __init__(
        self,
        port: int,
        device: str = "cpu",
        env: dict[str, str] | None = None,
        fail_on_load_error: bool = False,
    ) -> None:
        self.device = device
        self.block_dim = 1 if device == "cuda" else 0
        self.caches = kv_caches(device)
        self.registration = None
        self.settings = load_settings(
            {"lmcache.node.port": port, "lmcache.node.chunk_size": CHUNK,
             "lmcache.node.timeout_s": 2.0, "lmcache.node.reconnect_s": 0.1},
            env=env or {},
        )  # fmt: skip
        self.link = NodeLink(self.settings, name="test worker", on_connected=self._register)
        self.transfers = WorkerTransfers(
            self.link,
            namespace=lambda salt: NS,
            chunk_size=CHUNK,
            blocks_per_chunk=CHUNK // BLOCK,
            registration=lambda: self.registration,
            fail_on_load_error=fail_on_load_error,
            verifier=(
                KVVerifier(lambda: (self.caches, self.block_dim), CHUNK // BLOCK)
                if self.settings.verify
                else None
            ),
        )

    def _register(self, client: object) -> None:
        self.registration = register(  # as the connector does (LMCacheNodeConnector._register_with)
            client,  # type: ignore[arg-type]
            self.caches,
            block_dim=self.block_dim,
            block_size=BLOCK,
            namespace=NS,
            transfer_mode=self.settings.transfer_mode,
        )

    def fill(self, block_ids: list[int], seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for layer in self.caches:
            for b in block_ids:
                view = layer.select(self.block_dim, b)
                view.copy_(torch.randn(view.shape, generator=gen).to(layer.dtype))

    def blocks(self, layer: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return layer.narrow(self.block_dim, start, end - start).cpu()


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture
def server(ports: tuple[int, int], tmp_path: Path) -> Iterator[ServerProcess]:
    proc = start_server(*ports, tmp_path / "server.log")
    yield proc
    proc.kill()


def op(req: str, tokens: list[int], start: int, end: int, blocks: list[int]) -> TransferOp:
    return TransferOp(req, tokens[: end * CHUNK], start, end, blocks)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            ],
        ),
    ],
)
def test_store_then_retrieve_into_other_blocks(
    server: ServerProcess, ports: tuple[int, int], device: str
) -> None:
    a, b = Worker(ports[0], device), Worker(ports[0], device)
    a.link.start()
    b.link.start()
    try:
        tokens = list(range(3 * CHUNK))
        a.fill(list(range(12)), seed=1)
        a.transfers.store([op("r", tokens, 0, 3, list(range(12)))])
        b.transfers.load([op("r", tokens, 0, 3, list(range(20, 32)))])
        assert b.transfers.take_invalid_blocks() == set()
        for la, lb in zip(a.caches, b.caches, strict=True):
            assert torch.equal(a.blocks(la, 0, 12), b.blocks(lb, 20, 32))
            assert la.abs().sum() > 0
        assert b.transfers.stats.loaded_tokens == 3 * CHUNK
    finally:
        a.link.close()
        b.link.close()


def test_partial_hit_reports_the_rest_as_invalid(
    server: ServerProcess, ports: tuple[int, int]
) -> None:
    w = Worker(ports[0])
    w.link.start()
    try:
        tokens = list(range(3 * CHUNK))
        w.fill(list(range(4)), seed=2)
        w.transfers.store([op("r", tokens, 0, 1, [0, 1, 2, 3])])
        w.transfers.load([op("q", tokens, 0, 3, list(range(20, 32)))])
        assert w.transfers.take_invalid_blocks() == set(range(24, 32))
        assert w.transfers.take_invalid_blocks() == set()  # reported once
    finally:
        w.link.close()


def test_engine_transfer_mode_from_the_env_moves_the_same_bytes(
    server: ServerProcess, ports: tuple[int, int]
) -> None:
    """LMCACHE_NODE_TRANSFER_MODE=engine (the operator's transferMode) registers in engine
    mode; its stores are read back by a worker that shares its memory, byte for byte."""
    a = Worker(ports[0], env={"LMCACHE_NODE_TRANSFER_MODE": "engine"})
    b = Worker(ports[0], env={"LMCACHE_NODE_TRANSFER_MODE": "shared"})
    a.link.start()
    b.link.start()
    try:
        assert a.registration is not None and b.registration is not None
        assert (a.registration.transfer_mode, b.registration.transfer_mode) == ("engine", "shared")
        tokens = list(range(2 * CHUNK))
        a.fill(list(range(8)), seed=4)
        a.transfers.store([op("r", tokens, 0, 2, list(range(8)))])
        b.transfers.load([op("r", tokens, 0, 2, list(range(16, 24)))])
        assert b.transfers.take_invalid_blocks() == set()
        for la, lb in zip(a.caches, b.caches, strict=True):
            assert torch.equal(a.blocks(la, 0, 8), b.blocks(lb, 16, 24))
    finally:
        a.link.close()
        b.link.close()
    assert "engine on cpu" in server.log_tail(20000)


def test_failed_load_under_the_fail_policy_says_the_request_fails(
    server: ServerProcess, ports: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lmcache_node.vllm")
    w = Worker(ports[0], fail_on_load_error=True)
    w.link.start()
    try:
        tokens = list(range(2 * CHUNK))
        w.transfers.load([op("q", tokens, 0, 2, list(range(8)))])  # nothing stored: a miss
        assert w.transfers.take_invalid_blocks() == set(range(8))  # vLLM fails the request
    finally:
        w.link.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "request q: loaded only 0 of 128 tokens" in errors[0]
    assert "kv_load_failure_policy is 'fail', so vLLM fails the request" in errors[0]


def test_verify_mode_checks_every_loaded_chunk_against_the_saved_bytes(
    server: ServerProcess, ports: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    """LMCACHE_NODE_VERIFY=1: a chunk loaded back as saved matches; after the server lost
    it and another worker stored other bytes under the same key, the load is a mismatch,
    counted and logged once with its key."""
    caplog.set_level(logging.INFO, logger="lmcache_node.vllm")
    a = Worker(ports[0], env={"LMCACHE_NODE_VERIFY": "1"})
    other = Worker(ports[0])
    assert a.transfers.verifier is not None and other.transfers.verifier is None
    verifier = a.transfers.verifier
    a.link.start()
    other.link.start()
    try:
        tokens = list(range(3 * CHUNK))
        a.fill(list(range(12)), seed=5)
        a.transfers.store([op("r", tokens, 0, 3, list(range(12)))])
        a.transfers.load([op("s", tokens, 0, 3, list(range(20, 32)))])
        assert verifier.take_counts() == {"saved": 3, "matched": 3, "mismatched": 0,
                                          "unknown": 0}  # fmt: skip
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

        assert other.link.call("clear", lambda c: c.clear(), -1) == 3
        other.fill(list(range(12)), seed=6)  # other bytes, the same keys
        other.transfers.store([op("r", tokens, 0, 3, list(range(12)))])
        a.transfers.load([op("t", tokens, 0, 3, list(range(20, 32)))])
        a.transfers.load([op("u", tokens, 0, 2, list(range(24, 32)))])
    finally:
        a.link.close()
        other.link.close()
    assert verifier.take_counts() == {"saved": 0, "matched": 0, "mismatched": 5, "unknown": 0}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    keys = a.transfers.keys(op("t", tokens, 0, 3, []))
    assert len(errors) == 1, errors
    assert f"request t loaded chunk 0 (key {keys[0].hex()})" in errors[0]


@pytest.mark.slow
def test_server_down_then_up(ports: tuple[int, int], tmp_path: Path,
                             caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="lmcache_node.vllm")
    w = Worker(ports[0])
    w.link.start()  # nothing listens yet: the link retries in the background
    proc = None
    shm = ("--shm-dir", f"/dev/shm/lmcache-test-{os.getpid()}-{ports[0]}")  # kept by restarts
    try:
        assert not w.link.connected
        tokens = list(range(2 * CHUNK))
        w.transfers.load([op("r", tokens, 0, 2, list(range(8)))])
        w.transfers.load([op("s", tokens, 0, 2, list(range(8, 16)))])
        assert w.transfers.take_invalid_blocks() == set(range(16))
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per incident
        proc = start_server(*ports, tmp_path / "server.log", *shm)
        assert w.link.wait_connected(30)
        w.fill(list(range(8)), seed=3)
        w.transfers.store([op("r", tokens, 0, 2, list(range(8)))])
        assert w.transfers.stats.stored_tokens == 2 * CHUNK
        # a server restart: the client reconnects and re-registers by itself
        proc.kill()
        proc = start_server(*ports, tmp_path / "server2.log", *shm)

        def stored_again() -> bool:
            w.transfers.store([op("r", tokens, 0, 2, list(range(8)))])
            return w.transfers.stats.stored_tokens > 2 * CHUNK

        wait_until(stored_again, 10, "a store through the restarted server")
        assert w.transfers.stats.stored_tokens == 4 * CHUNK
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        w.link.close()
        if proc is not None:
            proc.kill()
        shutil.rmtree(shm[1], ignore_errors=True)
