"""Disk tier bench: chunk writes and cold reads vs plain sequential file I/O in the same run.

Raw: each 32 MiB chunk written with one write() + fsync to its own file, read back with one
readinto() after its cached pages were dropped (posix_fadvise DONTNEED). Tier: the same
chunks through ``DiskTier`` (header, checksum, temporary file, fsync, rename; cold reads check
the checksum). Measurements alternate raw and tier per chunk so both see the same disk state.
``LMCACHE_BENCH_DISK_DIR`` picks the directory (default: the system temp directory).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmcache_node.bench.common import CHUNK_BYTES, gbps
from lmcache_node.keys import ChunkKey, KeyNamespace, chunk_keys
from lmcache_node.tiers.disk import DiskTier
from lmcache_node.tiers.frame import (
    DEFAULT_LAYOUT,
    DISK_HEADER_BYTES,
    Codec,
    FrameHeader,
    encode_header,
)

BENCH_DIR_ENV = "LMCACHE_BENCH_DISK_DIR"


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _raw_write(path: Path, data: np.ndarray) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)  # type: ignore[arg-type]
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def _raw_read(path: Path, out: np.ndarray) -> float:
    _drop_cache(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as file:
        view = memoryview(out)  # type: ignore[arg-type]
        done = 0
        while done < len(view):
            got = file.readinto(view[done:])
            if not got:
                raise RuntimeError(f"short raw read of {path}")
            done += got
    return time.perf_counter() - start


def _tier_pass(
    tier: DiskTier, raw_dir: Path, chunks: int, src: torch.Tensor
) -> dict[str, float | bool]:
    """Per-chunk pairs (raw, tier) in alternating order; this disk's speed drifts a lot, so
    ratios are medians of the per-pair ratios and speeds use the median chunk time."""
    keys = chunk_keys(list(range(chunks * 16)), 16, KeyNamespace(model_name=f"bench-{id(tier)}"))
    data = src.numpy()
    out = torch.empty_like(src)
    out_np = out.numpy()
    times: dict[str, list[float]] = {"raw_write": [], "write": [], "raw_read": [], "read": []}

    def tier_write(key: ChunkKey) -> float:
        start = time.perf_counter()
        if not tier.store_from(key, [src], src.numel()):
            raise RuntimeError(f"disk tier store failed: {tier.stats()}")
        return time.perf_counter() - start

    exact = True

    def tier_read(key: ChunkKey) -> float:
        nonlocal exact
        tier.drop_page_cache(key)
        out.zero_()
        start = time.perf_counter()
        ok = tier.load_into(key, [out], out.numel())
        seconds = time.perf_counter() - start
        exact = exact and ok and torch.equal(out, src)
        return seconds

    for phase in ("write", "read"):
        for index, key in enumerate(keys):
            path = raw_dir / f"raw-{index}.bin"
            tier_first = index % 2 == 1
            for tier_turn in (tier_first, not tier_first):
                if tier_turn:
                    seconds = tier_write(key) if phase == "write" else tier_read(key)
                    times[phase].append(seconds)
                elif phase == "write":
                    times["raw_write"].append(_raw_write(path, data))
                else:
                    times["raw_read"].append(_raw_read(path, out_np))
    for index in range(chunks):
        (raw_dir / f"raw-{index}.bin").unlink()
    nbytes = src.numel()
    return {
        **{name: gbps(nbytes, statistics.median(samples)) for name, samples in times.items()},
        "write_ratio": statistics.median(
            r / t for r, t in zip(times["raw_write"], times["write"], strict=True)
        ),
        "read_ratio": statistics.median(
            r / t for r, t in zip(times["raw_read"], times["read"], strict=True)
        ),
        "exact": exact,
    }


def _rebuild_bench(root: Path, files: int) -> tuple[int, float]:
    """Time an index rebuild over ``files`` chunk files (tiny payloads, no fsync to create)."""
    keys = chunk_keys(list(range(files)), 1, KeyNamespace(model_name="bench-rebuild"))
    payload = b"x" * 64
    for key in keys:
        header = encode_header(
            FrameHeader(key, Codec.NAIVE, DISK_HEADER_BYTES, 64, 64, 0, DEFAULT_LAYOUT)
        )
        name = key.hex()
        shard = root / name[:2]
        shard.mkdir(parents=True, exist_ok=True)
        (shard / f"{name}.lmc").write_bytes(header + payload)
    start = time.perf_counter()
    tier = DiskTier(root, 1024**4)
    seconds = time.perf_counter() - start
    found = len(tier.indexed_keys())
    tier.close()
    if found != files:
        raise RuntimeError(f"rebuild found {found} of {files} files")
    return files, seconds


def run_disk_bench(quick: bool) -> dict[str, float | int | bool]:
    chunks = 6 if quick else 24
    base = os.environ.get(BENCH_DIR_ENV) or tempfile.gettempdir()
    work = Path(tempfile.mkdtemp(prefix="lmcache-disk-bench-", dir=base))
    try:
        src = torch.randint(0, 256, (CHUNK_BYTES,), dtype=torch.uint8)  # incompressible
        buffered = DiskTier(work / "tier", 4 * chunks * CHUNK_BYTES)
        result = _tier_pass(buffered, work, chunks, src)
        buffered.close()
        direct_tier = DiskTier(work / "tier-odirect", 4 * chunks * CHUNK_BYTES, use_odirect=True)
        direct = _tier_pass(direct_tier, work, chunks, src)
        odirect_used = direct_tier.direct.enabled
        direct_tier.close()
        files, rebuild_seconds = _rebuild_bench(work / "rebuild", 2_000 if quick else 20_000)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "disk_chunk_bytes": CHUNK_BYTES,
        "disk_chunks": chunks,
        "disk_raw_write_gbps": round(float(result["raw_write"]), 3),
        "disk_raw_read_gbps": round(float(result["raw_read"]), 3),
        "disk_write_gbps": round(float(result["write"]), 3),
        "disk_read_cold_gbps": round(float(result["read"]), 3),
        "disk_write_ratio": round(float(result["write_ratio"]), 3),
        "disk_read_ratio": round(float(result["read_ratio"]), 3),
        "disk_odirect": odirect_used,
        "disk_odirect_write_gbps": round(float(direct["write"]), 3),
        "disk_odirect_read_gbps": round(float(direct["read"]), 3),
        "disk_odirect_write_ratio": round(float(direct["write_ratio"]), 3),
        "disk_odirect_read_ratio": round(float(direct["read_ratio"]), 3),
        "disk_byte_exact": bool(result["exact"]) and bool(direct["exact"]),
        "disk_rebuild_files": files,
        "disk_rebuild_seconds": round(rebuild_seconds, 3),
    }
