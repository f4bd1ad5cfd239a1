"""Measurement helpers shared by the bench sections."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

# A Llama-3-8B-like layout: 32 layers, 8 KV heads, head dim 128, fp16, K and V.
LLAMA8B_LAYERS = 32
LLAMA8B_KV_HEADS = 8
LLAMA8B_HEAD_DIM = 128
CHUNK_TOKENS = 256
CHUNK_BYTES = LLAMA8B_LAYERS * 2 * CHUNK_TOKENS * LLAMA8B_KV_HEADS * LLAMA8B_HEAD_DIM * 2  # 32 MiB


class BenchUnavailableError(RuntimeError):
    """A section cannot run on this machine (e.g. no CUDA); the message says why."""


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall seconds of each of ``repeat`` calls."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


class MemcpyProbe:
    """A plain torch copy of ``nbytes`` between two touched CPU buffers: the physical limit.

    Benches interleave ``once()`` with the operation they measure so both see the same
    machine load, and report medians.
    """

    def __init__(self, nbytes: int = CHUNK_BYTES) -> None:
        self.nbytes = nbytes
        self.src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        self.dst = torch.zeros_like(self.src)
        self.samples: list[float] = []

    def once(self) -> float:
        start = time.perf_counter()
        self.dst.copy_(self.src)
        elapsed = time.perf_counter() - start
        self.samples.append(elapsed)
        return elapsed

    def gbps(self) -> float:
        return gbps(self.nbytes, statistics.median(self.samples))


def memcpy_gbps(nbytes: int = CHUNK_BYTES, repeat: int = 20) -> float:
    """The physical limit: a plain torch copy of ``nbytes`` between two CPU buffers (median)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    return gbps(nbytes, statistics.median(timed(lambda: dst.copy_(src), repeat)))


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0
