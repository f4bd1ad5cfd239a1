"""The disk tier with real files: round trips, restart, damage, cap, full and read-only disks."""

import logging
import os
from pathlib import Path

import pytest
import torch
from lmcache_node.tiers.disk import DiskTier, file_bytes_for
from lmcache_node.tiers.frame import DISK_HEADER_BYTES

from tests.node.tiers.conftest import make_keys, payload_for, remount_read_only

MIB = 1024**2


def store(tier: DiskTier, key: bytes, nbytes: int) -> bool:
    data = payload_for(key, nbytes)  # type: ignore[arg-type]
    return tier.store_from(key, [data[:1000], data[1000:]], nbytes)  # type: ignore[arg-type]


def load(tier: DiskTier, key: bytes, nbytes: int) -> torch.Tensor | None:
    out = torch.zeros(nbytes, dtype=torch.uint8)
    ok = tier.load_into(key, [out[:7], out[7:]], nbytes)  # type: ignore[arg-type]
    return out if ok else None


def chunk_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.lmc"))


@pytest.mark.parametrize("odirect", [False, True])
def test_round_trip_and_restart(tmp_path: Path, odirect: bool) -> None:
    keys = make_keys(5)
    sizes = [1, 4095, 4096, MIB + 17, 9 * MIB + 3]  # O_DIRECT: several bounce windows
    tier = DiskTier(tmp_path, 64 * MIB, use_odirect=odirect)
    for key, size in zip(keys, sizes, strict=True):
        assert store(tier, key, size)
    for key, size in zip(keys, sizes, strict=True):
        out = load(tier, key, size)
        assert out is not None and torch.equal(out, payload_for(key, size))
    assert tier.locate(keys) == sizes
    tier.close()

    again = DiskTier(tmp_path, 64 * MIB, use_odirect=not odirect)  # same format both ways
    assert again.locate(keys) == sizes
    assert again.stats().used_bytes == sum(file_bytes_for(s) for s in sizes)
    for key, size in zip(keys, sizes, strict=True):
        out = load(again, key, size)
        assert out is not None and torch.equal(out, payload_for(key, size))
    again.close()


def test_rebuild_removes_temporary_and_short_files(tmp_path: Path) -> None:
    keys = make_keys(3)
    tier = DiskTier(tmp_path, 16 * MIB)
    for key in keys:
        assert store(tier, key, 5000)
    tier.close()
    shard = tier.path_for(keys[0]).parent
    (shard / f".{keys[0].hex()}.123.0.tmp").write_bytes(b"half written")
    short = tier.path_for(keys[1])
    short.write_bytes(short.read_bytes()[: DISK_HEADER_BYTES - 1])
    (tmp_path / "README").write_text("not ours")  # foreign files are left alone

    again = DiskTier(tmp_path, 16 * MIB)
    assert set(again.indexed_keys()) == {keys[0], keys[2]}
    assert not list(tmp_path.glob("*/*.tmp"))
    assert not short.exists()
    assert (tmp_path / "README").exists()
    again.close()


def test_corrupt_truncated_and_missing_files_are_misses(tmp_path: Path) -> None:
    keys = make_keys(4)
    tier = DiskTier(tmp_path, 16 * MIB)
    for key in keys:
        assert store(tier, key, 20_000)
    flipped = tier.path_for(keys[0])
    data = bytearray(flipped.read_bytes())
    data[DISK_HEADER_BYTES + 1234] ^= 1
    flipped.write_bytes(bytes(data))
    truncated = tier.path_for(keys[1])
    truncated.write_bytes(truncated.read_bytes()[:-10])
    extended = tier.path_for(keys[2])
    extended.write_bytes(extended.read_bytes() + b"tail")
    tier.path_for(keys[3]).unlink()

    for key in keys:
        assert load(tier, key, 20_000) is None
    assert not flipped.exists() and not truncated.exists() and not extended.exists()
    stats = tier.stats()
    assert stats.corrupt == 3
    assert stats.entries == 0 and stats.used_bytes == 0
    assert tier.locate(keys) == []
    tier.close()


def test_wrong_size_request_is_a_miss(tmp_path: Path) -> None:
    key = make_keys(1)[0]
    tier = DiskTier(tmp_path, 16 * MIB)
    assert store(tier, key, 10_000)
    assert load(tier, key, 9_999) is None
    tier.close()


def test_cap_holds_with_lru_eviction(tmp_path: Path) -> None:
    chunk = MIB
    cap = 5 * file_bytes_for(chunk)
    tier = DiskTier(tmp_path, cap)
    keys = make_keys(12)
    for key in keys[:5]:
        assert store(tier, key, chunk)
    assert load(tier, keys[0], chunk) is not None  # keys[0] becomes most recent
    for key in keys[5:]:
        assert store(tier, key, chunk)
        on_disk = sum(p.stat().st_size for p in chunk_files(tmp_path))
        assert on_disk <= cap
        assert tier.stats().used_bytes <= cap
    assert set(tier.indexed_keys()) == set(keys[-5:])
    stats = tier.stats()
    assert stats.evictions == 7
    assert len(chunk_files(tmp_path)) == 5
    assert not store(tier, make_keys(1, "big")[0], cap)  # larger than the cap: refused
    tier.close()


def test_restart_with_a_smaller_cap_evicts_oldest(tmp_path: Path) -> None:
    keys = make_keys(6)
    tier = DiskTier(tmp_path, 64 * MIB)
    for index, key in enumerate(keys):
        assert store(tier, key, MIB)
        os.utime(tier.path_for(key), (1000 + index, 1000 + index))
    tier.close()
    smaller = DiskTier(tmp_path, 3 * file_bytes_for(MIB))
    assert smaller.indexed_keys() == keys[3:]
    assert len(chunk_files(tmp_path)) == 3
    smaller.close()


def test_full_disk_turns_stores_into_misses(
    small_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tier = DiskTier(small_tmpfs, 1024 * MIB)  # the cap says yes, the filesystem says no
    keys = make_keys(10)
    with caplog.at_level(logging.WARNING):
        results = [store(tier, key, MIB) for key in keys]
    assert results[0] and not results[-1]
    stored = [k for k, ok in zip(keys, results, strict=True) if ok]
    stats = tier.stats()
    assert stats.errors >= 1 and stats.dropped_stores == results.count(False)
    assert "full or read-only" in caplog.text
    assert not list(small_tmpfs.glob("*/*.tmp"))
    for key in stored:  # what was stored is intact
        out = load(tier, key, MIB)
        assert out is not None and torch.equal(out, payload_for(key, MIB))
    tier.close()


def test_read_only_disk_keeps_serving_reads(
    small_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = make_keys(2)
    tier = DiskTier(small_tmpfs, 1024 * MIB)
    assert store(tier, first, 100_000)
    tier.close()
    (small_tmpfs / "empty").mkdir()
    remount_read_only(small_tmpfs)
    restarted = DiskTier(small_tmpfs, 1024 * MIB)
    with caplog.at_level(logging.WARNING):
        assert not store(restarted, second, 100_000)
    assert "full or read-only" in caplog.text
    assert restarted.stats().dropped_stores == 1
    out = load(restarted, first, 100_000)
    assert out is not None and torch.equal(out, payload_for(first, 100_000))
    restarted.close()
    # A read-only directory without our lock file: the tier is off, nothing raises.
    off = DiskTier(small_tmpfs / "empty", 1024 * MIB)
    assert not off.available and not off.stats().available
    assert not store(off, second, 10) and load(off, first, 100_000) is None
    off.close()


def test_one_process_per_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    owner = DiskTier(tmp_path, 16 * MIB)
    with caplog.at_level(logging.ERROR):
        second = DiskTier(tmp_path, 16 * MIB, lock_wait_secs=0.2)
    assert owner.available and not second.available
    assert "another process holds" in caplog.text
    second.close()
    owner.close()
    third = DiskTier(tmp_path, 16 * MIB, lock_wait_secs=0.2)  # free again after close
    assert third.available
    third.close()


def test_concurrent_stores_of_one_key_write_one_file(tmp_path: Path) -> None:
    key = make_keys(1)[0]
    tier = DiskTier(tmp_path, 64 * MIB, workers=4)
    results: list[bool] = []
    for _ in range(8):
        tier.pool.submit(0, lambda: results.append(store(tier, key, MIB)))  # type: ignore[arg-type]
    assert tier.pool.drain(30)
    assert all(results) and len(results) == 8
    assert len(chunk_files(tmp_path)) == 1
    assert tier.stats().used_bytes == file_bytes_for(MIB)
    tier.close()
