"""Real server processes that restart on their L1 pool: kill -9 during a storm of stores
(never a corrupted chunk after adoption), a graceful restart (everything adopted), a second
server on the same pool (refused it), a changed chunk size (starts empty)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from lmcache_node.client import NodeClient, Registration
from lmcache_node.keys import ChunkKey
from lmcache_node.server.process import ServerProcess
from lmcache_node.transfer.shm_pool import POOL_NAME

from tests.node.tiers.conftest import make_keys, payload_for

CHUNK = 64  # tokens: 4 blocks of 16
BLOCKS = 4
LAYERS = 2
BLOCK_BYTES = 8 * 16 * 2048 * 2  # [8 heads, 16 tokens, 2048] float16: 512 KiB per layer
CHUNK_BYTES = LAYERS * BLOCKS * BLOCK_BYTES  # 4 MiB
POOL_CHUNKS = 32
KEYS = 64  # more than the pool holds: stores keep evicting
PER_CALL = 8  # the server spends most of a call copying: that is where the kills land
SERVER_ARGS = (
    "--chunk-size", str(CHUNK), "--cpu-buffer-size", str(POOL_CHUNKS * CHUNK_BYTES / 1024**3),
    "--l1-page-size", "256Ki", "--max-workers", "2", "--log-level", "INFO",
)  # fmt: skip


def kv_tensors(blocks: int) -> list[torch.Tensor]:
    return [torch.zeros(blocks, 8, 16, 2048, dtype=torch.float16) for _ in range(LAYERS)]


def block_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8).view(tensor.shape[0], -1)


def chunk_of(key: ChunkKey) -> list[torch.Tensor]:
    """The bytes of each (layer, block) of ``key``'s chunk, derived from the key."""
    data = payload_for(key, CHUNK_BYTES)
    return [data[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES] for i in range(LAYERS * BLOCKS)]


def fill_blocks(tensors: list[torch.Tensor], key: ChunkKey, first_block: int) -> None:
    parts = chunk_of(key)
    for layer, tensor in enumerate(tensors):
        for block in range(BLOCKS):
            block_bytes(tensor)[first_block + block].copy_(parts[layer * BLOCKS + block])


# For each "<endpoint> <seed>" line: stores PER_CALL random chunks per call until the server
# dies, printing "filled" once more distinct chunks than the pool holds were stored. One
# process for all rounds: its imports and chunk bytes are made once.
STORM = textwrap.dedent(
    """
    import random, sys
    from lmcache_node.client import NodeClient
    from tests.node.server.test_restart import (
        BLOCKS, KEYS, PER_CALL, POOL_CHUNKS, fill_blocks, kv_tensors,
    )
    from tests.node.tiers.conftest import make_keys

    keys = make_keys(KEYS, "restart")
    tensors = kv_tensors(KEYS * BLOCKS)
    for index, key in enumerate(keys):
        fill_blocks(tensors, key, index * BLOCKS)
    for line in sys.stdin:
        endpoint, seed = line.split()
        client = NodeClient(endpoint, timeout_s=30, expected_chunk_size=BLOCKS * 16)
        client.connect()
        registration = client.register_kv_caches(tensors, block_dim=0, block_size=16)
        rng = random.Random(int(seed))
        stored = set()
        try:
            while True:
                picks = rng.sample(range(KEYS), PER_CALL)
                blocks = [b for i in picks for b in range(i * BLOCKS, (i + 1) * BLOCKS)]
                client.store(registration, [keys[i] for i in picks], blocks)
                if len(stored) < POOL_CHUNKS + 8:
                    stored.update(picks)
                    if len(stored) >= POOL_CHUNKS + 8:
                        print("filled", flush=True)
        except Exception as exc:  # the server was killed
            print("lost", type(exc).__name__, file=sys.stderr, flush=True)
    """
)


@pytest.fixture
def shm_path() -> Iterator[Path]:
    path = Path("/dev/shm") / f"lmcache-test-restart-{uuid.uuid4().hex[:12]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def readyz(server: ServerProcess) -> dict[str, object]:
    with urllib.request.urlopen(server.http_url + "/readyz", timeout=10) as response:
        return dict(json.loads(response.read())["l1"])


def metric(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def check_every_chunk(server: ServerProcess, keys: list[ChunkKey]) -> int:
    """Retrieve every chunk the server says it has; each must be the bytes stored under its
    key. Returns how many it had."""
    tensors = kv_tensors(BLOCKS)
    found = 0
    with NodeClient(server.endpoint, timeout_s=30, expected_chunk_size=CHUNK) as client:
        client.connect()
        registration = client.register_kv_caches(tensors, block_dim=0, block_size=16)
        for key in keys:
            if client.lookup([key])[0] == 0:
                continue
            for tensor in tensors:
                tensor.zero_()
            assert client.retrieve(registration, [key], list(range(BLOCKS))) == 1
            parts = chunk_of(key)
            for layer, tensor in enumerate(tensors):
                for block in range(BLOCKS):
                    got = block_bytes(tensor)[block]
                    assert torch.equal(got, parts[layer * BLOCKS + block]), "corrupt chunk"
            found += 1
    return found


def store_chunks(client: NodeClient, keys: list[ChunkKey]) -> Registration:
    tensors = kv_tensors(len(keys) * BLOCKS)
    for index, key in enumerate(keys):
        fill_blocks(tensors, key, index * BLOCKS)
    registration = client.register_kv_caches(tensors, block_dim=0, block_size=16)
    assert client.store(registration, keys, list(range(len(keys) * BLOCKS))) == len(keys)
    return registration


@pytest.mark.slow
def test_kill_nine_during_stores_never_yields_a_corrupted_chunk(
    shm_path: Path, tmp_path: Path
) -> None:
    repo = Path(__file__).resolve().parents[3]
    keys = make_keys(KEYS, "restart")
    rng = random.Random(20)
    args = (*SERVER_ARGS, "--shm-dir", str(shm_path))
    server = ServerProcess(*args, log_file=tmp_path / "server.log").start()
    storm = subprocess.Popen(
        [sys.executable, "-c", STORM], cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert storm.stdin is not None and storm.stdout is not None
    try:
        for round_ in range(4):
            storm.stdin.write(f"{server.endpoint} {round_}\n")
            storm.stdin.flush()
            assert storm.stdout.readline().strip() == "filled", server.log_tail()
            time.sleep(rng.random() * 0.3)
            os.kill(server.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
            server.proc.wait(30)  # type: ignore[union-attr]
            server = ServerProcess(*args, log_file=tmp_path / "server.log").start()
            state = readyz(server)
            assert state["pool"] == "adopted", state
            found = check_every_chunk(server, keys)
            assert found == state["adopted_entries"]
            # all but the one chunk a worker was writing when the kill came
            assert found >= POOL_CHUNKS - 1, (found, state)
    finally:
        server.kill()
        storm.kill()
        storm.wait(30)


@pytest.mark.slow
def test_a_graceful_restart_adopts_the_pool_and_one_pool_has_one_server(
    shm_path: Path, tmp_path: Path
) -> None:
    keys = make_keys(10, "graceful")
    args = (*SERVER_ARGS, "--shm-dir", str(shm_path))
    log = tmp_path / "server.log"
    with ServerProcess(*args, log_file=log) as first:
        assert readyz(first)["pool"] == "created"
        with NodeClient(first.endpoint, timeout_s=30, expected_chunk_size=CHUNK) as client:
            client.connect()
            store_chunks(client, keys)
        assert first.terminate() == 0  # SIGTERM, as in a rollout: the pool stays
    assert (shm_path / POOL_NAME).exists()

    with ServerProcess(*args, log_file=log) as second:
        state = readyz(second)
        assert state["pool"] == "adopted" and state["persistent"] is True
        assert state["adopted_entries"] == 10 and state["adopted_bytes"] == 10 * CHUNK_BYTES
        assert state["capacity_bytes"] == POOL_CHUNKS * CHUNK_BYTES
        assert state["used_bytes"] == 10 * CHUNK_BYTES
        assert metric(second, "lmcache_node_l1_pool_adopted") == 1
        assert metric(second, "lmcache_node_l1_adopted_entries") == 10
        assert check_every_chunk(second, keys) == 10

        with ServerProcess(*args, log_file=log) as third:  # the same shm_dir, at once
            state = readyz(third)
            assert state["pool"] == "anonymous" and state["persistent"] is False
            assert "in use by another live cache server" in str(state["reason"])
            assert check_every_chunk(third, keys) == 0
        assert check_every_chunk(second, keys) == 10  # untouched by the third

    changed = [a if a != str(CHUNK) else str(CHUNK // 2) for a in args]  # another chunk size
    with ServerProcess(*changed, log_file=log) as fourth:
        state = readyz(fourth)
        assert state["pool"] == "created" and state["adopted_entries"] == 0
        assert f"chunk size is {CHUNK}, this server's is {CHUNK // 2}" in str(state["reason"])
        assert metric(fourth, "lmcache_node_l1_pool_adopted") == 0
