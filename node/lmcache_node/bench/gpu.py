"""GPU bench (``lmcache-node bench --device cuda``): the CUDA IPC path against the PCIe limit.

A real server process serving CUDA and a client whose KV caches live on the GPU in vLLM's
GPU layout ``[2, blocks, 128, heads, head_dim]`` (Llama-3-8B-like, fp16), shared with the
server through CUDA IPC. The physical limits, measured in the same run: a device-to-host
``copy_`` of one chunk's bytes into pinned host memory (what a store moves) and the
host-to-device copy back (what a retrieve moves), each synchronised. Every ratio divides a
store by the D2H limit and a retrieve by the H2D limit.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmcache_node.bench.common import (
    CHUNK_BYTES,
    CHUNK_TOKENS,
    LLAMA8B_HEAD_DIM,
    LLAMA8B_KV_HEADS,
    LLAMA8B_LAYERS,
    BenchUnavailableError,
    gbps,
    p50_ms,
)
from lmcache_node.client import NodeClient, Registration
from lmcache_node.server.process import ServerProcess

BLOCK = 16  # vLLM's default GPU block size
BLOCKS_PER_CHUNK = CHUNK_TOKENS // BLOCK


class CopyLimit:
    """Synchronised D2H and H2D copies of ``nbytes`` between the GPU and pinned host memory."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.device = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.d2h: list[float] = []
        self.h2d: list[float] = []

    def once(self) -> None:
        for source, target, samples in (
            (self.device, self.host, self.d2h),
            (self.host, self.device, self.h2d),
        ):
            torch.cuda.synchronize()
            start = time.perf_counter()
            target.copy_(source, non_blocking=True)
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)

    def gbps(self) -> tuple[float, float]:
        median = statistics.median
        return gbps(self.nbytes, median(self.d2h)), gbps(self.nbytes, median(self.h2d))


def _layers(layers: int, blocks: int) -> list[torch.Tensor]:
    shape = (2, blocks, BLOCK, LLAMA8B_KV_HEADS, LLAMA8B_HEAD_DIM)
    return [torch.randn(shape, device="cuda").to(torch.float16) for _ in range(layers)]


def _blocks(chunk: int, chunks: int, total: int) -> list[int]:
    first = (chunk * BLOCKS_PER_CHUNK) % total
    return list(range(first, first + chunks * BLOCKS_PER_CHUNK))


def _timed_transfers(
    client: NodeClient,
    reg: Registration,
    limit: CopyLimit,
    *,
    calls: int,
    per_call: int,
    total: int,
) -> tuple[list[float], list[float], bool]:
    """Store ``calls`` x ``per_call`` fresh chunks and retrieve them into other blocks; the
    seconds of each call, and whether every retrieved byte equals the stored one."""
    stores, retrieves, exact = [], [], True
    for call in range(calls):
        keys = [os.urandom(16) for _ in range(per_call)]
        source = _blocks(call * per_call, per_call, total // 2)
        target = [b + total // 2 for b in source]
        limit.once()
        start = time.perf_counter()
        if client.store(reg, keys, source, timeout_s=120) != per_call:
            raise RuntimeError("gpu bench: a store was not kept")
        stores.append(time.perf_counter() - start)
        start = time.perf_counter()
        if client.retrieve(reg, keys, target, timeout_s=120) != per_call:
            raise RuntimeError("gpu bench: a retrieve found nothing")
        retrieves.append(time.perf_counter() - start)
        for tensor in reg.tensors[:2]:
            exact &= bool(torch.equal(tensor[:, source], tensor[:, target]))
    return stores, retrieves, exact


def run_gpu_bench(quick: bool) -> dict[str, float | int | bool | str]:
    if not torch.cuda.is_available():
        raise BenchUnavailableError(
            "lmcache-node bench --device cuda needs a CUDA device this PyTorch can use "
            f"(torch {torch.__version__}, CUDA {torch.version.cuda})"
        )
    layers = 4 if quick else LLAMA8B_LAYERS
    chunk_bytes = CHUNK_BYTES * layers // LLAMA8B_LAYERS
    bulk = 8 if quick else 32
    total = 4 * bulk * BLOCKS_PER_CHUNK
    calls = 6 if quick else 20
    l1_gb = max(0.5, 3 * bulk * chunk_bytes / 1024**3)
    with tempfile.TemporaryDirectory(prefix="lmcache-node-gpu-bench-") as tmp:
        server = ServerProcess(
            "--device", "cuda", "--chunk-size", str(CHUNK_TOKENS), "--cpu-buffer-size",
            f"{l1_gb:.3f}", "--max-workers", "1", "--log-level", "WARNING",
            "--shm-dir", str(Path(tmp) / "shm"), log_file=Path(tmp) / "server.log",
            startup_timeout_s=300,
        )  # fmt: skip
        with server, NodeClient(server.endpoint, timeout_s=120) as client:
            client.connect()
            limit = CopyLimit(chunk_bytes)
            reg = client.register_kv_caches(
                _layers(layers, total), block_dim=1, block_size=BLOCK, transfer_mode="shared",
                layout="bench-vllm-cuda",
            )  # fmt: skip
            _timed_transfers(client, reg, limit, calls=2, per_call=bulk, total=total)  # warm-up
            limit.d2h.clear()
            limit.h2d.clear()
            store_1, retrieve_1, exact_1 = _timed_transfers(
                client, reg, limit, calls=calls, per_call=1, total=total
            )
            store_n, retrieve_n, exact_n = _timed_transfers(
                client, reg, limit, calls=3, per_call=bulk, total=total
            )
            lookups = []
            keys = [os.urandom(16) for _ in range(bulk)]
            client.store(reg, keys, _blocks(0, bulk, total // 2))
            for _ in range(50):
                start = time.perf_counter()
                client.lookup(keys)
                lookups.append(time.perf_counter() - start)
            client.unregister(reg)
    d2h, h2d = limit.gbps()
    median = statistics.median
    store = gbps(chunk_bytes, median(store_1))
    retrieve = gbps(chunk_bytes, median(retrieve_1))
    store_bulk = gbps(chunk_bytes * bulk, median(store_n))
    retrieve_bulk = gbps(chunk_bytes * bulk, median(retrieve_n))
    return {
        "gpu_name": torch.cuda.get_device_name(0),
        "gpu_d2h_gbps": round(d2h, 2),
        "gpu_h2d_gbps": round(h2d, 2),
        "gpu_store_gbps": round(store, 2),
        "gpu_retrieve_gbps": round(retrieve, 2),
        f"gpu_store_{bulk}_gbps": round(store_bulk, 2),
        f"gpu_retrieve_{bulk}_gbps": round(retrieve_bulk, 2),
        "gpu_store_ratio": round(store / d2h, 3),
        "gpu_retrieve_ratio": round(retrieve / h2d, 3),
        f"gpu_store_{bulk}_ratio": round(store_bulk / d2h, 3),
        f"gpu_retrieve_{bulk}_ratio": round(retrieve_bulk / h2d, 3),
        "gpu_byte_exact": exact_1 and exact_n,
        "gpu_lookup_p50_ms": round(p50_ms(lookups), 3),
        "gpu_chunk_mib": round(chunk_bytes / 1024**2, 2),
        "gpu_layers": layers,
    }
