"""Server bench: store/retrieve/lookup through a real server process and the real client.

Llama-3-8B-like KV caches (32 layers, 8 KV heads, head dim 128, fp16; 256-token chunks of
32 MiB) in the vLLM CPU layout ``[blocks, heads, 128, 2*head_dim]`` and in the GPU layout
``[2, blocks, 128, heads, head_dim]`` on CPU tensors, shared with the server through
/dev/shm. The physical limit is a plain memcpy of one chunk between two touched CPU buffers
in the same run: one thread, timed right before every measured call, and threaded, timed
apart; the faster median is ``server_memcpy_gbps`` and every ratio divides by it. The
server runs with CURVE keys, as it does off loopback; ``bench/auth.py`` then measures the
same calls with and without authentication (``auth_overhead_ratio``).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmcache_node.bench.auth import curve_keys, measure_auth_overhead
from lmcache_node.bench.common import (
    CHUNK_BYTES,
    CHUNK_TOKENS,
    LLAMA8B_HEAD_DIM,
    LLAMA8B_KV_HEADS,
    LLAMA8B_LAYERS,
    MemcpyProbe,
    gbps,
    p50_ms,
)
from lmcache_node.client import NodeClient, Registration
from lmcache_node.server.process import ServerProcess
from lmcache_node.transfer import shm

BLOCK = 128
BLOCKS_PER_CHUNK = CHUNK_TOKENS // BLOCK


def _cpu_layout(layers: int, blocks: int) -> list[torch.Tensor]:
    shape = (blocks, LLAMA8B_KV_HEADS, BLOCK, 2 * LLAMA8B_HEAD_DIM)
    return [torch.ones(shape, dtype=torch.float16) for _ in range(layers)]


def _gpu_layout(layers: int, blocks: int) -> list[torch.Tensor]:
    shape = (2, blocks, BLOCK, LLAMA8B_KV_HEADS, LLAMA8B_HEAD_DIM)
    return [torch.ones(shape, dtype=torch.float16) for _ in range(layers)]


class _Limit:
    """The physical limit: a plain memcpy of one chunk between two touched CPU buffers.

    One thread, timed right before every measured call (same load). The threaded torch copy
    is measured apart, in a block with a pause after it: interleaved, its OpenMP workers
    keep spinning on the second core while the server works, which slowed the measured
    calls 2-3x on a 2-core machine. The limit is the faster of the two medians.
    """

    def __init__(self, nbytes: int) -> None:
        self.single = MemcpyProbe(nbytes)
        self.threaded_gbps = 0.0

    def measure_threaded(self, repeat: int = 10) -> None:
        probe = MemcpyProbe(self.single.nbytes)
        probe.src, probe.dst = self.single.src, self.single.dst
        threads = torch.get_num_threads()
        torch.set_num_threads(max(2, os.cpu_count() or 1))
        try:
            for _ in range(repeat):
                probe.once()
        finally:
            torch.set_num_threads(threads)
        self.threaded_gbps = max(self.threaded_gbps, probe.gbps())
        time.sleep(0.5)  # let the OpenMP workers stop spinning

    def measure_shm(self, repeat: int = 10) -> tuple[float, float]:
        """One-thread memcpy from and into a /dev/shm mapping (tmpfs, 4 KiB pages unless
        the host enables huge pages for shmem): the ceiling of the shared-memory path."""
        directory = shm.ShmDirectory.prepare(f"/dev/shm/lmcache-bench-{os.getpid()}")  # noqa: S108
        segment = directory.create("bench", self.single.nbytes)
        mapped = segment.tensor
        try:
            mapped.copy_(self.single.src)
            reads, writes = [], []
            for _ in range(repeat):
                start = time.perf_counter()
                self.single.dst.copy_(mapped)
                reads.append(time.perf_counter() - start)
                start = time.perf_counter()
                mapped.copy_(self.single.src)
                writes.append(time.perf_counter() - start)
        finally:
            directory.unlink(segment.name)
            segment.release()
            directory.close()
            os.rmdir(directory.path)
        nbytes = self.single.nbytes
        return gbps(nbytes, statistics.median(reads)), gbps(nbytes, statistics.median(writes))

    def once(self) -> float:
        return gbps(self.single.nbytes, self.single.once())

    def clear(self) -> None:
        self.single.samples.clear()

    def gbps(self) -> float:
        return max(self.threaded_gbps, self.single.gbps())


@dataclass
class _Transfer:
    """GB/s of each measured call."""

    store_gbps: list[float] = field(default_factory=list)
    retrieve_gbps: list[float] = field(default_factory=list)

    def medians(self) -> tuple[float, float]:
        return statistics.median(self.store_gbps), statistics.median(self.retrieve_gbps)


def _blocks(chunk: int, chunks_per_call: int, total_blocks: int) -> list[int]:
    first = (chunk * BLOCKS_PER_CHUNK) % total_blocks
    return list(range(first, first + chunks_per_call * BLOCKS_PER_CHUNK))


def _transfer(
    client: NodeClient,
    reg: Registration,
    probe: _Limit,
    *,
    calls: int,
    chunks_per_call: int,
    total_blocks: int,
) -> _Transfer:
    """Store ``calls`` x ``chunks_per_call`` fresh chunks, then retrieve them back.

    A one-thread memcpy is timed right before each call, so the limit's median and the
    calls' median see the same load.
    """
    per_call = reg.chunk_bytes * chunks_per_call
    out = _Transfer()
    batches: list[tuple[list[bytes], list[int]]] = []
    for call in range(calls):
        keys = [os.urandom(16) for _ in range(chunks_per_call)]
        blocks = _blocks(call * chunks_per_call, chunks_per_call, total_blocks)
        probe.once()
        start = time.perf_counter()
        stored = client.store(reg, keys, blocks, timeout_s=120)
        speed = gbps(per_call, time.perf_counter() - start)
        if stored != chunks_per_call:
            raise RuntimeError(f"bench store kept {stored} of {chunks_per_call} chunks")
        out.store_gbps.append(speed)
        batches.append((keys, blocks))
    for keys, blocks in batches[-max(1, calls // 2) :] * 2:
        probe.once()
        start = time.perf_counter()
        got = client.retrieve(reg, keys, blocks, timeout_s=120)
        speed = gbps(per_call, time.perf_counter() - start)
        if got != len(keys):
            raise RuntimeError(f"bench retrieve found {got} of {len(keys)} chunks")
        out.retrieve_gbps.append(speed)
    return out


def run_server_bench(quick: bool) -> dict[str, float | int | bool]:
    layers = 4 if quick else LLAMA8B_LAYERS
    bulk = 8 if quick else 64
    single_calls = 8 if quick else 40
    bulk_calls = 2 if quick else 3
    lookups = 100 if quick else 400
    scale = layers / LLAMA8B_LAYERS
    total_blocks = bulk * BLOCKS_PER_CHUNK
    l1_gb = max(0.25, (bulk + 8) * CHUNK_BYTES * scale / 1024**3)
    result: dict[str, float | int | bool] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the client only waits; idle OpenMP workers would spin
    try:
        result = _run(
            layers=layers, bulk=bulk, single_calls=single_calls, bulk_calls=bulk_calls,
            lookups=lookups, scale=scale, total_blocks=total_blocks, l1_gb=l1_gb,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return result


def _run(
    *,
    layers: int,
    bulk: int,
    single_calls: int,
    bulk_calls: int,
    lookups: int,
    scale: float,
    total_blocks: int,
    l1_gb: float,
) -> dict[str, float | int | bool]:
    result: dict[str, float | int | bool] = {}
    with (
        tempfile.TemporaryDirectory(prefix="lmcache-node-bench-") as tmp,
        curve_keys(Path(tmp) / "keys") as (curve_args, credentials),
    ):
        server = ServerProcess(
            "--chunk-size", str(CHUNK_TOKENS), "--cpu-buffer-size", f"{l1_gb:.3f}",
            "--max-workers", "1", "--log-level", "WARNING", *curve_args,
            log_file=Path(tmp) / "server.log", startup_timeout_s=300,
        )  # fmt: skip
        with (
            server,
            NodeClient(
                server.endpoint, timeout_s=60, expected_chunk_size=256, credentials=credentials
            ) as client,
        ):
            client.connect()
            probe = _Limit(int(CHUNK_BYTES * scale))
            cpu_reg = client.register_kv_caches(
                _cpu_layout(layers, total_blocks), block_dim=0, block_size=BLOCK,
                layout="bench-vllm-cpu-blocks128",
            )  # fmt: skip
            # warm-up: fault in the server's mappings of the shared pages and the L1 pool
            _transfer(
                client, cpu_reg, probe, calls=2, chunks_per_call=bulk, total_blocks=total_blocks
            )
            probe.clear()
            probe.measure_threaded()
            server.clear_cache()
            store_1, retrieve_1 = _transfer(
                client, cpu_reg, probe, calls=single_calls, chunks_per_call=1,
                total_blocks=total_blocks,
            ).medians()  # fmt: skip
            store_64, retrieve_64 = _transfer(
                client, cpu_reg, probe, calls=bulk_calls, chunks_per_call=bulk,
                total_blocks=total_blocks,
            ).medians()  # fmt: skip
            client.unregister(cpu_reg)
            server.clear_cache()

            gpu_blocks = 8 * BLOCKS_PER_CHUNK
            gpu_reg = client.register_kv_caches(
                _gpu_layout(layers, gpu_blocks), block_dim=1, block_size=BLOCK,
                layout="bench-vllm-cuda-kvfirst-on-cpu",
            )  # fmt: skip
            _transfer(client, gpu_reg, probe, calls=2, chunks_per_call=8, total_blocks=gpu_blocks)
            gpu_store, gpu_retrieve = _transfer(
                client, gpu_reg, probe, calls=single_calls, chunks_per_call=1,
                total_blocks=gpu_blocks,
            ).medians()  # fmt: skip

            misses = 0
            for _ in range(single_calls):
                key = os.urandom(16)
                client.store(gpu_reg, [key], [0, 1])
                misses += client.lookup([key])[0] != 1
            client.unregister(gpu_reg)
            server.clear_cache()

            # lookups of a 100-chunk prefix that is all hits: a tiny layout stores 100 keys
            small = client.register_kv_caches(
                [torch.zeros(2, 1, BLOCK, 2, dtype=torch.float16)], block_dim=0,
                block_size=BLOCK, layout="bench-lookup",
            )  # fmt: skip
            prefix = [os.urandom(16) for _ in range(100)]
            for key in prefix:
                client.store(small, [key], [0, 1])
            samples = []
            for _ in range(lookups):
                start = time.perf_counter()
                hits, _ = client.lookup(prefix)
                samples.append(time.perf_counter() - start)
                if hits != 100:
                    raise RuntimeError(f"bench lookup hit {hits} of 100 chunks")
            client.unregister(small)
            probe.measure_threaded()
            shm_read, shm_write = probe.measure_shm()
            memcpy = probe.gbps()
            memcpy_threaded = probe.threaded_gbps
            memcpy_single = probe.single.gbps()
        result.update(
            measure_auth_overhead(
                layers=layers, rounds=12 if single_calls < 20 else 40, tmp=Path(tmp)
            )
        )
    result.update(
        {
            "server_memcpy_gbps": round(memcpy, 2),
            "server_memcpy_threaded_gbps": round(memcpy_threaded, 2),
            "server_memcpy_1thread_gbps": round(memcpy_single, 2),
            "server_shm_read_gbps": round(shm_read, 2),
            "server_shm_write_gbps": round(shm_write, 2),
            "server_store_gbps": round(store_1, 2),
            "server_retrieve_gbps": round(retrieve_1, 2),
            "server_store_64_gbps": round(store_64, 2),
            "server_retrieve_64_gbps": round(retrieve_64, 2),
            "server_store_gpu_layout_gbps": round(gpu_store, 2),
            "server_retrieve_gpu_layout_gbps": round(gpu_retrieve, 2),
            "server_store_ratio": round(store_1 / memcpy, 3),
            "server_retrieve_ratio": round(retrieve_1 / memcpy, 3),
            "server_store_64_ratio": round(store_64 / memcpy, 3),
            "server_retrieve_64_ratio": round(retrieve_64 / memcpy, 3),
            "server_store_gpu_layout_ratio": round(gpu_store / memcpy, 3),
            "server_retrieve_gpu_layout_ratio": round(gpu_retrieve / memcpy, 3),
            "server_lookup_100_chunks_p50_ms": round(p50_ms(samples), 3),
            "server_lookup_100_chunks_p99_ms": round(
                sorted(samples)[int(len(samples) * 0.99) - 1] * 1000, 3
            ),
            "store_then_lookup_miss_ratio": misses / single_calls,
            "server_chunk_mib": round(CHUNK_BYTES * scale / 1024**2, 2),
            "server_layers": layers,
        }
    )
    return result
