"""In-process engine bench: store/retrieve of 32 MiB chunks vs memcpy, and lookups."""

from __future__ import annotations

import statistics
import time

import torch

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
from lmcache_node.engine import CacheEngine, StoreOutcome
from lmcache_node.engine.memory import as_bytes
from lmcache_node.keys import ChunkKey, KeyNamespace, chunk_keys


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

    probe = MemcpyProbe(CHUNK_BYTES)
    store_seconds: list[float] = []
    for key in keys:
        probe.once()  # more keys than the pool holds: eviction is part of the measured path
        start = time.perf_counter()
        outcome, reservation = engine.reserve(key, CHUNK_BYTES)
        if reservation is None:
            raise RuntimeError(f"bench store failed: {outcome}")
        reservation.span.write(sources)
        engine.commit(reservation)
        store_seconds.append(time.perf_counter() - start)

    resident = keys[-min(chunks_in_pool, len(keys)) :]
    retrieve_seconds: list[float] = []
    for _ in range(max(1, rounds // len(resident))):
        for key in resident:
            probe.once()
            start = time.perf_counter()
            pinned = engine.pin([key])
            pinned[0].span.read_into(destinations)
            engine.unpin(pinned)
            retrieve_seconds.append(time.perf_counter() - start)
    exact = all(torch.equal(a, b) for a, b in zip(outputs, layers, strict=True))

    lookup = _lookup_bench(repeat=50 if quick else 200)
    limit = probe.gbps()
    store = gbps(CHUNK_BYTES, statistics.median(store_seconds))
    retrieve = gbps(CHUNK_BYTES, statistics.median(retrieve_seconds))
    return {
        "chunk_bytes": CHUNK_BYTES,
        "memcpy_gbps": round(limit, 3),
        "store_gbps": round(store, 3),
        "retrieve_gbps": round(retrieve, 3),
        "store_ratio": round(store / limit, 3),
        "retrieve_ratio": round(retrieve / limit, 3),
        "retrieve_byte_exact": exact,
        **lookup,
    }


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
