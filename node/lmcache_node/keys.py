"""Chunk keys: a chained hash over fixed-size token chunks, namespaced.

key(i) = BLAKE2b-128(key(i-1) || little-endian int64 token ids of chunk i), with key(-1) the
BLAKE2b-128 of the namespace fields. ``hashlib`` only (no dependency vLLM lacks);
deterministic across processes, machines and any PYTHONHASHSEED. The server names
``HASH_ALGORITHM`` in its handshake and the client refuses a server that keys differently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

import msgspec
import numpy as np

HASH_ALGORITHM = "blake2b-128-chain-v1"
KEY_BYTES = 16

ChunkKey = NewType("ChunkKey", bytes)


def _blake2b(data: bytes) -> hashlib.blake2b:
    return hashlib.blake2b(data, digest_size=KEY_BYTES)


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
        return _blake2b(encoded).digest()

    def label(self) -> str:
        """LMCache-style human label: fmt@model@world_size@worker_id@dtype."""
        return f"{self.layout}@{self.model_name}@{self.world_size}@{self.worker_id}@{self.kv_dtype}"


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(tokens, dtype="<i8").tobytes()


def chunk_keys(
    tokens: Sequence[int] | np.ndarray, chunk_size: int, namespace: KeyNamespace
) -> list[ChunkKey]:
    """Keys of the whole chunks of ``tokens`` (a trailing partial chunk has none)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    data = memoryview(_token_bytes(tokens))
    step = chunk_size * 8
    keys: list[ChunkKey] = []
    previous = namespace.seed()
    for start in range(0, len(data) - step + 1, step):
        hasher = _blake2b(previous)
        hasher.update(data[start : start + step])
        previous = hasher.digest()
        keys.append(ChunkKey(previous))
    return keys


def key_hex(key: bytes) -> str:
    return key.hex()
