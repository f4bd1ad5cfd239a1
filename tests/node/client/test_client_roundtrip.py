"""Byte-exact store/retrieve through a real server for every KV layout (CPU shared memory)."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lmcache_node.client import NodeClient, RemoteError
from lmcache_node.keys import KeyNamespace, chunk_keys

from tests.support import wait_until

pytestmark = pytest.mark.integration  # real server processes / subprocesses

BLOCK = 16
NUM_BLOCKS = 24


def vllm_cpu() -> tuple[list[torch.Tensor], int]:
    # [num_blocks, heads, block_size, 2*head_dim]
    return [torch.randn(NUM_BLOCKS, 2, BLOCK, 16, dtype=torch.float16) for _ in range(3)], 0


def vllm_gpu_on_cpu() -> tuple[list[torch.Tensor], int]:
    # [2, num_blocks, block_size, heads, head_dim]
    return [torch.randn(2, NUM_BLOCKS, BLOCK, 2, 8, dtype=torch.bfloat16) for _ in range(3)], 1


def mla() -> tuple[list[torch.Tensor], int]:
    # [num_blocks, block_size, latent]
    return [torch.randn(NUM_BLOCKS, BLOCK, 24, dtype=torch.float16) for _ in range(2)], 0


def multi_group() -> tuple[list[torch.Tensor], int]:
    first = [torch.randn(NUM_BLOCKS, 2, BLOCK, 16, dtype=torch.float16) for _ in range(2)]
    second = [torch.randn(NUM_BLOCKS, 1, BLOCK, 8, dtype=torch.float32) for _ in range(2)]
    return first + second, 0


def views_of_one_buffer() -> tuple[list[torch.Tensor], int]:
    buffer = torch.randn(4, NUM_BLOCKS, 2, BLOCK, 16, dtype=torch.float16)
    return list(buffer.unbind(0)), 0


LAYOUTS: dict[str, Callable[[], tuple[list[torch.Tensor], int]]] = {
    "vllm-cpu": vllm_cpu,
    "vllm-gpu-layout-on-cpu": vllm_gpu_on_cpu,
    "mla": mla,
    "multi-group": multi_group,
    "views-of-one-buffer": views_of_one_buffer,
}


def block(tensor: torch.Tensor, dim: int, index: int) -> torch.Tensor:
    return tensor.select(dim, index).contiguous().view(torch.uint8)


@pytest.mark.parametrize("mode", ["shared", "engine"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_roundtrip_is_byte_exact(client: NodeClient, layout: str, mode: str) -> None:
    layers, dim = LAYOUTS[layout]()
    originals = [t.clone() for t in layers]
    reg = client.register_kv_caches(layers, block_dim=dim, block_size=BLOCK, transfer_mode=mode)
    assert reg.blocks_per_chunk == 4
    for tensor, original in zip(layers, originals, strict=True):  # registration keeps values
        assert torch.equal(tensor.view(torch.uint8), original.view(torch.uint8))
    keys = [os.urandom(16) for _ in range(3)]
    source = [3, 4, 5, 6, 0, 9, 2, 11, 20, 21, 22, 23]  # consecutive and scattered ids
    assert client.store(reg, keys, source) == 3
    assert client.lookup(keys) == (3, None)
    target = [12, 13, 14, 15, 1, 7, 8, 10, 16, 17, 18, 19]
    assert client.retrieve(reg, keys, target) == 3
    for tensor, original in zip(layers, originals, strict=True):
        for src, dst in zip(source, target, strict=True):
            assert torch.equal(block(tensor, dim, dst), block(original, dim, src))
    client.unregister(reg)


def test_keys_from_tokens_and_partial_last_chunk(client: NodeClient) -> None:
    layers, dim = vllm_cpu()
    originals = [t.clone() for t in layers]
    namespace = KeyNamespace("tiny", layout="vllm-cpu-blocks16")
    reg = client.register_kv_caches(layers, block_dim=dim, block_size=BLOCK, namespace=namespace)
    # one full chunk and a chunk of 2 blocks (a tail); the server takes keys as opaque bytes
    keys = [*chunk_keys(list(range(64)), 64, namespace), os.urandom(16)]
    assert client.store(reg, keys, [0, 1, 2, 3, 4, 5]) == 2
    assert client.retrieve(reg, keys, [10, 11, 12, 13, 14, 15]) == 2
    for tensor, original in zip(layers, originals, strict=True):
        assert torch.equal(tensor[10:16], original[0:6])
    with pytest.raises(RemoteError) as info:  # 2 keys need more than 4 block ids
        client.store(reg, keys, [0, 1, 2])
    assert info.value.code == "bad_request"


def test_retrieve_returns_leading_hits_only(client: NodeClient) -> None:
    layers, dim = vllm_cpu()
    reg = client.register_kv_caches(layers, block_dim=dim, block_size=BLOCK)
    keys = [os.urandom(16) for _ in range(3)]
    assert client.store(reg, keys[:1], [0, 1, 2, 3]) == 1
    before = [t.clone() for t in layers]
    assert client.retrieve(reg, keys, list(range(4, 16))) == 1
    for tensor, old in zip(layers, before, strict=True):
        assert torch.equal(tensor[8:16], old[8:16])  # blocks of the misses untouched


def test_duplicate_store_counts_as_stored(client: NodeClient) -> None:
    layers, dim = vllm_cpu()
    reg = client.register_kv_caches(layers, block_dim=dim, block_size=BLOCK)
    keys = [os.urandom(16) for _ in range(2)]
    assert client.store(reg, keys, list(range(8))) == 2
    assert client.store(reg, keys, list(range(8, 16))) == 2
    assert client.stats()["tiers"]["l1"]["duplicates"] >= 2


def test_lookup_right_after_store_never_misses(client: NodeClient) -> None:
    layers, dim = vllm_cpu()
    reg = client.register_kv_caches(layers, block_dim=dim, block_size=BLOCK)
    misses = 0
    for _ in range(50):
        key = os.urandom(16)
        assert client.store(reg, [key], [0, 1, 2, 3]) == 1
        misses += client.lookup([key])[0] != 1
    assert misses == 0


def test_async_and_concurrent_clients(client: NodeClient, server: object) -> None:
    from lmcache_node.server.process import ServerProcess

    assert isinstance(server, ServerProcess)
    layers, dim = vllm_cpu()
    originals = [t.clone() for t in layers]
    reg = client.register_kv_caches(layers, block_dim=dim, block_size=BLOCK)
    keys = [os.urandom(16) for _ in range(6)]
    futures = [
        client.store_async(
            reg, [key], [4 * (i % 6), 4 * (i % 6) + 1, 4 * (i % 6) + 2, 4 * (i % 6) + 3]
        )
        for i, key in enumerate(keys)
    ]
    assert [f.result(timeout=30) for f in futures] == [1] * 6
    errors: list[BaseException] = []

    def other_client() -> None:
        try:
            with NodeClient(server.endpoint, timeout_s=10) as other:
                other.connect()
                for _ in range(20):
                    assert other.lookup(keys) == (6, None)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=other_client) for _ in range(3)]
    for thread in threads:
        thread.start()
    results = [client.retrieve_async(reg, [k], [0, 1, 2, 3]).result(timeout=30) for k in keys[:1]]
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert results == [1]
    for tensor, original in zip(layers, originals, strict=True):
        assert torch.equal(tensor[0:4], original[0:4])


def test_many_threads_share_one_client(client: NodeClient) -> None:
    keys = [os.urandom(16) for _ in range(4)]
    failures: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(50):
                assert client.lookup(keys) == (0, None)
                client.ping()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures


def test_server_logs_in_lmcache_words(client: NodeClient, server_log: Path) -> None:
    layers, dim = vllm_cpu()
    reg = client.register_kv_caches(layers, block_dim=dim, block_size=BLOCK, worker_id=3)
    key = os.urandom(16)
    assert client.store(reg, [key], [0, 1, 2, 3]) == 1
    assert client.retrieve(reg, [key], [4, 5, 6, 7]) == 1
    client.unregister(reg)
    text = wait_until(
        lambda: "Unregistered KV cache of worker 3" in (t := server_log.read_text()) and t,
        10,
        "the unregistration in the server log",
    )
    assert re.search(r"Stored 64 tokens in \d+\.\d{3} seconds", text)
    assert re.search(r"Retrieved 64 tokens in \d+\.\d{3} seconds", text)
    assert re.search(r"Registered KV cache for worker 3 .*: 3 layers", text)
    assert re.search(r"Unregistered KV cache of worker 3 .*: 3 layers", text)
