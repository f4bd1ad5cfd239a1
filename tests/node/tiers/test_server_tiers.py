"""Real server processes with lower tiers: a restarted node keeps its disk cache, and a node
on "another machine" reads from Redis what the first one stored, byte-exact over ZMQ."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lmcache_node.client import NodeClient
from lmcache_node.server.process import ServerProcess

from tests.node.tiers.conftest import RedisServer
from tests.support import wait_until

pytestmark = pytest.mark.integration  # real server processes / subprocesses

CHUNK = 64  # tokens: 4 blocks of 16
BLOCK = 16
NUM_BLOCKS = 24


def server_args(*extra: str) -> list[str]:
    return [
        "--chunk-size", str(CHUNK), "--cpu-buffer-size", "0.05", "--l1-page-size", "4096",
        "--max-workers", "2", *extra,
    ]  # fmt: skip


def kv_layers(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(NUM_BLOCKS, 2, BLOCK, 16, generator=generator).to(torch.float16)
        for _ in range(3)
    ]


def blocks(layers: list[torch.Tensor], ids: list[int]) -> list[torch.Tensor]:
    return [layer[i].clone() for layer in layers for i in ids]


def store_chunks(endpoint: str, keys: list[bytes], layers: list[torch.Tensor]) -> None:
    client = NodeClient(endpoint, timeout_s=20.0, expected_chunk_size=CHUNK)
    client.connect()
    try:
        reg = client.register_kv_caches(layers, block_dim=0, block_size=BLOCK)
        assert client.store(reg, keys, list(range(4 * len(keys)))) == len(keys)
        client.unregister(reg)
    finally:
        client.close()


def retrieve_chunks(endpoint: str, keys: list[bytes], expected: list[torch.Tensor]) -> int:
    """Lookup (which promotes from lower tiers), then retrieve into fresh blocks."""
    client = NodeClient(endpoint, timeout_s=20.0, expected_chunk_size=CHUNK)
    client.connect()
    try:
        layers = [torch.zeros(NUM_BLOCKS, 2, BLOCK, 16, dtype=torch.float16) for _ in range(3)]
        reg = client.register_kv_caches(layers, block_dim=0, block_size=BLOCK)
        hits, lock_id = client.lookup(keys, lock=True)
        target = list(range(NUM_BLOCKS - 4 * len(keys), NUM_BLOCKS))
        got = client.retrieve(reg, keys[:hits], target[: 4 * hits])
        if lock_id is not None:
            client.free_lock(lock_id)
        assert got == hits
        for index in range(got):
            for layer_no, layer in enumerate(layers):
                for block_no in range(4):
                    have = layer[target[4 * index + block_no]]
                    want = expected[layer_no * 4 * len(keys) + 4 * index + block_no]
                    assert torch.equal(have.view(torch.uint8), want.view(torch.uint8))
        client.unregister(reg)
        return got
    finally:
        client.close()


@pytest.mark.slow
def test_restarted_server_serves_its_disk_cache(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    args = server_args("--local-disk", f"file://{disk}/", "--max-local-disk-size", "0.1")
    keys = [os.urandom(16) for _ in range(3)]
    layers = kv_layers(1)
    expected = blocks(layers, list(range(12)))
    with ServerProcess(*args, log_file=tmp_path / "first.log") as first:
        store_chunks(first.endpoint, keys, layers)
        wait_until(lambda: len(list(disk.glob("*/*.lmc"))) == 3, 30, "3 chunk files on disk")
    with ServerProcess(*args, log_file=tmp_path / "second.log") as second:
        assert retrieve_chunks(second.endpoint, keys, expected) == 3


@pytest.mark.slow
@pytest.mark.redis
def test_second_node_reads_what_the_first_stored(tmp_path: Path, redis_server: RedisServer) -> None:
    secret = tmp_path / "remote.key"
    secret.write_bytes(os.urandom(32))
    remote = (
        "--remote-url", redis_server.url, "--remote-serde", "zstd",
        "--remote-secret-file", str(secret),
    )  # fmt: skip
    keys = [os.urandom(16) for _ in range(3)]
    layers = kv_layers(2)
    expected = blocks(layers, list(range(12)))
    node_a = ServerProcess(
        *server_args(
            "--local-disk", f"file://{tmp_path}/a/", "--max-local-disk-size", "0.1", *remote
        ),
        log_file=tmp_path / "a.log",
    )
    node_b = ServerProcess(*server_args(*remote), log_file=tmp_path / "b.log")  # no disk
    with node_a, node_b:
        store_chunks(node_a.endpoint, keys, layers)
        client = redis_server.client()
        wait_until(lambda: len(client.keys("lmcache:*")) == 3, 30, "3 chunks in Redis")
        assert retrieve_chunks(node_b.endpoint, keys, expected) == 3
        redis_server.stop()  # Redis gone: node B still serves what it promoted into L1
        assert retrieve_chunks(node_b.endpoint, keys, expected) == 3
        other = [os.urandom(16) for _ in range(2)]
        assert retrieve_chunks(node_b.endpoint, other, []) == 0  # misses, not errors


def test_stats_and_metrics_show_the_disk_tier_and_sigterm_flushes_it(tmp_path: Path) -> None:
    """/stats lists every tier, /metrics has per-tier series, SIGTERM finishes write-downs."""
    import json
    import urllib.request

    from lmcache_node.keys import KeyNamespace, chunk_keys

    disk = tmp_path / "disk"
    keys = chunk_keys(list(range(CHUNK * 2)), CHUNK, KeyNamespace(model_name="stats"))
    args = server_args("--local-disk", f"file://{disk}/", "--max-local-disk-size", "0.01")
    with ServerProcess(*args) as server:
        store_chunks(server.endpoint, list(keys), kv_layers(3))
        with urllib.request.urlopen(server.http_url + "/stats", timeout=10) as reply:
            tiers = json.load(reply)["tiers"]
        assert "l1" in tiers and "disk" in tiers, tiers.keys()
        with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as reply:
            metrics = reply.read().decode()
        assert 'lmcache_node_tier_capacity_bytes{tier="disk"}' in metrics
        assert server.terminate() == 0
    files = list(disk.rglob("*.lmc"))
    assert len(files) == len(keys)  # nothing queued was lost at shutdown


@pytest.mark.redis
def test_server_refuses_a_remote_tier_without_a_secret(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    log = tmp_path / "refused.log"
    proc = ServerProcess(*server_args("--remote-url", redis_server.url), log_file=log)
    try:
        with pytest.raises(RuntimeError, match="exited with 1"):
            proc.start()
    finally:
        proc.kill()  # a server that wrongly started must not outlive the test
    text = log.read_text()
    assert "remote_secret_file" in text and "insecure_allow_unauthenticated" in text
    assert redis_server.client().dbsize() == 0
