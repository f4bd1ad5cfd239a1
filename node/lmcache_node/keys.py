"""Chunk keys: a chained hash over fixed-size token chunks, namespaced.

key(i) = xxh3_128(key(i-1) || little-endian int64 token ids of chunk i), with key(-1) the
namespace seed. Deterministic across processes, machines and any PYTHONHASHSEED.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

import msgspec
import numpy as np
import xxhash

HASH_ALGORITHM = "xxh3_128-chain-v1"
KEY_BYTES = 16

ChunkKey = NewType("ChunkKey", bytes)


@dataclass(frozen=True)
class KeyNamespace:
    """What must match for two workers to share entries."""

    model_name: str
    world_size: int = 1
    worker_id: int = 0
    kv_dtype: str = "float16"
    layout: str = "vllm"
    tenant_salt: str = ""

    def seed(self) -> bytes:
        """The first link of the chain: a hash of the namespace fields, in a fixed encoding."""
        encoded = msgspec.msgpack.encode(
            [
                HASH_ALGORITHM,
                self.model_name,
                self.world_size,
                self.worker_id,
                self.kv_dtype,
                self.layout,
                self.tenant_salt,
            ]
        )
        return xxhash.xxh3_128_digest(encoded)

    def label(self) -> str:
        """LMCache-style human label: fmt@model@world_size@worker_id@dtype."""
        return f"{self.layout}@{self.model_name}@{self.world_size}@{self.worker_id}@{self.kv_dtype}"


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(tokens, dtype="<i8").tobytes()


def chunk_keys(
    tokens: Sequence[int] | np.ndarray,
    chunk_size: int,
    namespace: KeyNamespace,
    *,
    save_unfull_chunk: bool = False,
) -> list[ChunkKey]:
    """Keys of the chunks of ``tokens``; a trailing partial chunk only if ``save_unfull_chunk``."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    data = _token_bytes(tokens)
    total = len(data) // 8
    full = total // chunk_size
    ends = [chunk_size * (i + 1) for i in range(full)]
    if save_unfull_chunk and total % chunk_size:
        ends.append(total)
    keys: list[ChunkKey] = []
    previous = namespace.seed()
    start = 0
    for end in ends:
        hasher = xxhash.xxh3_128(previous)
        hasher.update(data[start * 8 : end * 8])
        previous = hasher.digest()
        keys.append(ChunkKey(previous))
        start = end
    return keys


def chunk_token_counts(num_tokens: int, chunk_size: int, *, save_unfull_chunk: bool) -> list[int]:
    """How many tokens each key of ``chunk_keys`` covers."""
    counts = [chunk_size] * (num_tokens // chunk_size)
    if save_unfull_chunk and num_tokens % chunk_size:
        counts.append(num_tokens % chunk_size)
    return counts


def key_hex(key: bytes) -> str:
    return key.hex()
