"""Restart bench: fill a real server's L1 pool, kill -9 it, start a new server on the same
pool, then look up and retrieve everything.

Llama-3-8B-like chunks (32 MiB; 4 layers in quick mode) in the vLLM CPU layout, shared
through /dev/shm, stored by the real client over loopback (no credentials there).
``restart_adopt_s``: from starting the new server process to its /readyz saying ready with
the pool adopted (Python and torch imports included). ``restart_hit_ratio``: chunks retrieved
after the restart / chunks stored before the kill; ``restart_byte_exact``: every retrieved
chunk has the bytes stored under its key (xxh3 of each chunk, before and after).
``restart_first_retrieve_gbps``: the first pass over everything (both processes still map
pages in for the first time: the client's segments, the adopted pool while its background
populate runs); ``restart_retrieve_gbps``: a second pass.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import xxhash

from lmcache_node.bench.common import CHUNK_BYTES, CHUNK_TOKENS, LLAMA8B_LAYERS, gbps
from lmcache_node.bench.server import BLOCK, BLOCKS_PER_CHUNK, _cpu_layout
from lmcache_node.client import NodeClient, Registration
from lmcache_node.server.process import ServerProcess

PER_CALL = 8  # chunks per store/retrieve call


def run_restart_bench(quick: bool) -> dict[str, float | int | bool]:
    layers = 4 if quick else LLAMA8B_LAYERS
    chunks = 16 if quick else 32  # full: 32 x 32 MiB = 1 GiB
    chunk_bytes = CHUNK_BYTES * layers // LLAMA8B_LAYERS
    pool_mib = (chunks + 2) * chunk_bytes // 1024**2
    shm_dir = Path("/dev/shm") / f"lmcache-bench-restart-{os.getpid()}"  # noqa: S108
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the client only waits; idle OpenMP workers would spin
    try:
        with tempfile.TemporaryDirectory(prefix="lmcache-node-bench-") as tmp:
            args = (
                "--chunk-size", str(CHUNK_TOKENS), "--cpu-buffer-size", f"{pool_mib}Mi",
                "--max-workers", "1", "--log-level", "WARNING", "--shm-dir", str(shm_dir),
            )  # fmt: skip
            return _run(args, Path(tmp), layers=layers, chunks=chunks, chunk_bytes=chunk_bytes)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(shm_dir, ignore_errors=True)


def _run(
    args: tuple[str, ...], tmp: Path, *, layers: int, chunks: int, chunk_bytes: int
) -> dict[str, float | int | bool]:
    tensors = _cpu_layout(layers, chunks * BLOCKS_PER_CHUNK)
    for tensor in tensors:
        tensor.view(torch.uint8).random_(0, 256)
    keys = [os.urandom(16) for _ in range(chunks)]
    digests = _digests(tensors, chunks)

    started = time.perf_counter()
    first = ServerProcess(*args, log_file=tmp / "server.log", startup_timeout_s=300).start()
    cold_start_s = time.perf_counter() - started
    try:
        with NodeClient(first.endpoint, timeout_s=120, expected_chunk_size=CHUNK_TOKENS) as client:
            client.connect()
            registration = _register(client, tensors)
            stored = sum(
                client.store(registration, keys[i : i + PER_CALL], _blocks(i, keys, PER_CALL))
                for i in range(0, chunks, PER_CALL)
            )
        first.kill()  # SIGKILL: no exit path runs
    finally:
        first.kill()

    started = time.perf_counter()
    second = ServerProcess(*args, log_file=tmp / "server.log", startup_timeout_s=300).start()
    adopt_s = time.perf_counter() - started
    try:
        l1 = _readyz_l1(second)
        for tensor in tensors:
            tensor.zero_()
        with NodeClient(second.endpoint, timeout_s=120, expected_chunk_size=CHUNK_TOKENS) as client:
            client.connect()
            registration = _register(client, tensors)
            hits, _ = client.lookup(keys)
            retrieved, first_s = _retrieve_all(client, registration, keys)
            exact = _digests(tensors, chunks) == digests
            again, again_s = _retrieve_all(client, registration, keys)  # mappings warm now
        second.terminate()
    finally:
        second.kill()
    adopted = l1.get("adopted_entries")
    return {
        "restart_chunks_stored": stored,
        "restart_stored_gib": round(stored * chunk_bytes / 1024**3, 3),
        "restart_cold_start_s": round(cold_start_s, 2),
        "restart_adopt_s": round(adopt_s, 2),
        "restart_pool_adopted": l1.get("pool") == "adopted",
        "restart_adopted_chunks": adopted if isinstance(adopted, int) else 0,
        "restart_lookup_hits": hits,
        "restart_hit_ratio": round(retrieved / stored, 4) if stored else 0.0,
        "restart_byte_exact": exact and retrieved == stored,
        "restart_first_retrieve_gbps": round(gbps(retrieved * chunk_bytes, first_s), 2),
        "restart_retrieve_gbps": round(gbps(again * chunk_bytes, again_s), 2),
    }


def _retrieve_all(
    client: NodeClient, registration: Registration, keys: list[bytes]
) -> tuple[int, float]:
    """Chunks retrieved and the seconds it took."""
    start = time.perf_counter()
    retrieved = sum(
        client.retrieve(registration, keys[i : i + PER_CALL], _blocks(i, keys, PER_CALL))
        for i in range(0, len(keys), PER_CALL)
    )
    return retrieved, time.perf_counter() - start


def _register(client: NodeClient, tensors: list[torch.Tensor]) -> Registration:
    return client.register_kv_caches(
        tensors, block_dim=0, block_size=BLOCK, layout="bench-restart-vllm-cpu"
    )


def _blocks(first: int, keys: list[bytes], count: int) -> list[int]:
    last = min(first + count, len(keys))
    return list(range(first * BLOCKS_PER_CHUNK, last * BLOCKS_PER_CHUNK))


def _digests(tensors: list[torch.Tensor], chunks: int) -> list[int]:
    """xxh3-64 of each chunk's blocks, layer by layer."""
    digests = []
    for chunk in range(chunks):
        hasher = xxhash.xxh3_64()
        for tensor in tensors:
            blocks = tensor[chunk * BLOCKS_PER_CHUNK : (chunk + 1) * BLOCKS_PER_CHUNK]
            hasher.update(blocks.contiguous().view(torch.uint8).numpy().data)
        digests.append(hasher.intdigest())
    return digests


def _readyz_l1(server: ServerProcess) -> dict[str, object]:
    with urllib.request.urlopen(server.http_url + "/readyz", timeout=30) as response:  # noqa: S310
        return dict(json.loads(response.read()).get("l1", {}))
