"""In-process engine bench: store/retrieve of 32 MiB chunks vs memcpy, and lookups.

Each store and retrieve runs twice, interleaved (same load): on an engine over anonymous
memory (``store_gbps``...) and on one over the server's persistent L1 pool, a named shm
segment whose commits and evictions are journaled (``pool_store_gbps``...). The
``pool_*_vs_anonymous`` ratios are what persistence costs on the store and retrieve paths.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from lmcache_node.assembly import build_engine
from lmcache_node.bench.common import (
    CHUNK_BYTES,
    CHUNK_TOKENS,
    LLAMA8B_HEAD_DIM,
    LLAMA8B_KV_HEADS,
    LLAMA8B_LAYERS,
    MemcpyProbe,
    gbps,
    p50_ms,
    timed,
)
from lmcache_node.config import load_config
from lmcache_node.engine import CacheEngine, StoreOutcome
from lmcache_node.engine.memory import as_bytes
from lmcache_node.keys import ChunkKey, KeyNamespace, chunk_keys
from lmcache_node.transfer.shm import ShmDirectory


def _layer_tensors() -> list[torch.Tensor]:
    shape = (2, CHUNK_TOKENS, LLAMA8B_KV_HEADS, LLAMA8B_HEAD_DIM)
    return [torch.randn(shape).to(torch.float16) for _ in range(LLAMA8B_LAYERS)]


def run_engine_bench(quick: bool) -> dict[str, float | int | bool]:
    rounds = 8 if quick else 32
    layers = _layer_tensors()
    sources = [as_bytes(t) for t in layers]
    outputs = [torch.zeros_like(t) for t in layers]
    destinations = [as_bytes(t) for t in outputs]
    chunks_in_pool = 8
    engine = CacheEngine(CHUNK_BYTES * chunks_in_pool, page_size=2 * 1024**2)
    namespace = KeyNamespace(model_name="bench-llama3-8b", kv_dtype="float16", layout="bench")
    keys = chunk_keys(list(range(CHUNK_TOKENS * rounds)), CHUNK_TOKENS, namespace)

    with _pool_engine(CHUNK_BYTES * chunks_in_pool) as pooled:
        probe = MemcpyProbe(CHUNK_BYTES)
        times: dict[str, list[float]] = {"store": [], "pool_store": []}
        for index, key in enumerate(keys):
            probe.once()  # more keys than the pool holds: eviction is part of the measured path
            for name, target in _alternate(index, ("store", engine), ("pool_store", pooled)):
                times[name].append(_store(target, key, sources))

        resident = keys[-min(chunks_in_pool, len(keys)) :]
        times.update(retrieve=[], pool_retrieve=[])
        for round_ in range(max(1, rounds // len(resident))):
            for index, key in enumerate(resident):
                probe.once()
                pair = (("retrieve", engine), ("pool_retrieve", pooled))
                for name, target in _alternate(round_ + index, *pair):
                    times[name].append(_retrieve(target, key, destinations))
        exact = all(torch.equal(a, b) for a, b in zip(outputs, layers, strict=True))

    lookup = _lookup_bench(repeat=50 if quick else 200)
    limit = probe.gbps()
    speed = {name: gbps(CHUNK_BYTES, statistics.median(t)) for name, t in times.items()}
    store, retrieve = speed["store"], speed["retrieve"]
    return {
        "chunk_bytes": CHUNK_BYTES,
        "memcpy_gbps": round(limit, 3),
        "store_gbps": round(store, 3),
        "retrieve_gbps": round(retrieve, 3),
        "store_ratio": round(store / limit, 3),
        "retrieve_ratio": round(retrieve / limit, 3),
        "retrieve_byte_exact": exact,
        "pool_store_gbps": round(speed["pool_store"], 3),
        "pool_retrieve_gbps": round(speed["pool_retrieve"], 3),
        "pool_store_vs_anonymous": round(speed["pool_store"] / store, 3),
        "pool_retrieve_vs_anonymous": round(speed["pool_retrieve"] / retrieve, 3),
        **lookup,
    }


@contextlib.contextmanager
def _pool_engine(capacity: int) -> Iterator[CacheEngine]:
    """An engine on a fresh persistent pool in its own shm directory, pages mapped."""
    path = Path("/dev/shm") / f"lmcache-bench-pool-{os.getpid()}"  # noqa: S108
    directory = ShmDirectory.prepare(path)
    try:
        sizes = {"max_local_cpu_size": f"{capacity // 1024**2}Mi", "l1_page_size": "2Mi"}
        config = load_config(sizes, environ={})
        engine = build_engine(config, directory)
        if engine.pool_state.origin != "created":
            raise RuntimeError(f"bench pool not created: {engine.pool_state.reason}")
        for thread in threading.enumerate():
            if thread.name == "lmcache-node-populate":
                thread.join()  # the anonymous pool is prefaulted too
        yield engine
    finally:
        directory.close()
        shutil.rmtree(path, ignore_errors=True)


def _alternate(
    index: int, first: tuple[str, CacheEngine], second: tuple[str, CacheEngine]
) -> tuple[tuple[str, CacheEngine], ...]:
    return (first, second) if index % 2 == 0 else (second, first)


def _store(engine: CacheEngine, key: ChunkKey, sources: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    outcome, reservation = engine.reserve(key, CHUNK_BYTES)
    if reservation is None:
        raise RuntimeError(f"bench store failed: {outcome}")
    reservation.span.write(sources)
    engine.commit(reservation)
    return time.perf_counter() - start


def _retrieve(engine: CacheEngine, key: ChunkKey, destinations: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    pinned = engine.pin([key])
    pinned[0].span.read_into(destinations)
    engine.unpin(pinned)
    return time.perf_counter() - start


def _lookup_bench(repeat: int) -> dict[str, float | int | bool]:
    engine = CacheEngine(100 * 4096, page_size=4096)
    namespace = KeyNamespace(model_name="bench-lookup")
    tokens = list(range(100 * CHUNK_TOKENS))
    keys: list[ChunkKey] = chunk_keys(tokens, CHUNK_TOKENS, namespace)
    payload = torch.zeros(1024, dtype=torch.uint8)
    for key in keys:
        if engine.put(key, payload) is not StoreOutcome.RESERVED:
            raise RuntimeError("lookup bench could not fill its engine")
    hits: list[int] = []
    lookups = timed(lambda: hits.append(engine.lookup(keys).hits), repeat)
    hashing = timed(lambda: chunk_keys(tokens, CHUNK_TOKENS, namespace), repeat)
    return {
        "lookup_100_chunks_p50_ms": round(p50_ms(lookups), 4),
        "lookup_100_chunks_hits": min(hits),
        "hash_100_chunks_p50_ms": round(p50_ms(hashing), 4),
    }
