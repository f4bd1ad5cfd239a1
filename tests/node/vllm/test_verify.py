"""Verify mode's digests and counts (lmcache_node.vllm.verify), without a server."""

from __future__ import annotations

import logging

import pytest
import torch
from lmcache_node.keys import ChunkKey
from lmcache_node.vllm.verify import KVVerifier, chunk_digest

BLOCKS, BPC = 16, 2


def caches(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(BLOCKS, 2, 4, 8, generator=gen).to(torch.bfloat16) for _ in range(3)]


def key(n: int) -> ChunkKey:
    return ChunkKey(bytes([n]) * 32)


def test_the_digest_covers_every_layer_in_block_order() -> None:
    kv = caches()
    base = chunk_digest(kv, 0, [3, 4])
    assert chunk_digest(kv, 0, [3, 4]) == base
    assert chunk_digest(kv, 0, [4, 3]) != base  # order is part of the chunk
    kv[2][4, 1, 3, 7] += 1  # one element of the last layer
    assert chunk_digest(kv, 0, [3, 4]) != base


def test_the_same_bytes_in_other_blocks_give_the_same_digest() -> None:
    kv = caches()
    for layer in kv:
        layer[10:12] = layer[3:5]
    assert chunk_digest(kv, 0, [10, 11]) == chunk_digest(kv, 0, [3, 4])


def test_block_dim_one_layout() -> None:
    kv = [torch.arange(2 * BLOCKS * 4, dtype=torch.float16).reshape(2, BLOCKS, 4)]
    moved = [layer.clone() for layer in kv]
    moved[0][:, 8:10] = kv[0][:, 0:2]
    assert chunk_digest(moved, 1, [8, 9]) == chunk_digest(kv, 1, [0, 1])
    assert chunk_digest(moved, 1, [8, 9]) != chunk_digest(kv, 0, [0, 1])


def test_counts_and_the_first_mismatch(caplog: pytest.LogCaptureFixture) -> None:
    kv = caches()
    verifier = KVVerifier(lambda: (kv, 0), BPC)
    verifier.saved([key(1), key(2)], [0, 1, 2, 3])
    for layer in kv:
        layer[6:10] = layer[0:4]
    assert verifier.loaded("a", [key(1), key(2)], [6, 7, 8, 9]) == 0
    assert verifier.loaded("b", [key(3)], [0, 1]) == 0  # never saved here
    kv[0][9] += 1
    with caplog.at_level(logging.ERROR):
        assert verifier.loaded("c", [key(1), key(2)], [6, 7, 8, 9]) == 1
        assert verifier.loaded("d", [key(2)], [8, 9]) == 1
    assert verifier.take_counts() == {"saved": 2, "matched": 3, "mismatched": 2, "unknown": 1}
    assert verifier.take_counts() == dict.fromkeys(verifier.totals, 0)
    assert verifier.totals["mismatched"] == 2
    assert verifier.first_mismatch == ("c", key(2))
    assert len(caplog.records) == 1
    assert f"request c loaded chunk 1 (key {key(2).hex()})" in caplog.records[0].getMessage()


def test_a_recomputed_chunk_keeps_both_digests() -> None:
    """The server keeps the first bytes it got; a re-save with other bits must not make
    the first ones a mismatch."""
    kv = caches()
    verifier = KVVerifier(lambda: (kv, 0), BPC)
    first = [layer[0:2].clone() for layer in kv]
    verifier.saved([key(1)], [0, 1])
    kv[1][0] += 1
    verifier.saved([key(1)], [0, 1])
    assert verifier.loaded("x", [key(1)], [0, 1]) == 0
    for layer, old in zip(kv, first, strict=True):
        layer[0:2] = old
    assert verifier.loaded("y", [key(1)], [0, 1]) == 0


def test_digests_are_bounded() -> None:
    kv = caches()
    verifier = KVVerifier(lambda: (kv, 0), BPC, max_keys=2)
    verifier.saved([key(1), key(2), key(3)], list(range(6)))
    verifier.loaded("z", [key(1)], [0, 1])
    assert verifier.take_counts()["unknown"] == 1  # the oldest key's digest was dropped
