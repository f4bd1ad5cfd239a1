"""The engine with a real disk tier below it: write-down, lookup past L1, promotion, pins."""

import threading
from pathlib import Path

import pytest
import torch
from lmcache_node.assembly import build_engine
from lmcache_node.config import load_config
from lmcache_node.engine import CacheEngine
from lmcache_node.engine.types import EntryState
from lmcache_node.tiers.disk import DiskTier
from lmcache_node.tiers.manager import TieredStore, WritePolicy
from lmcache_node.tiers.workers import Priority

from tests.node.tiers.conftest import make_keys, payload_for

PAGE = 4096
CHUNK = 3 * PAGE + 100


def engine_with_disk(
    root: Path, pages: int = 16, policy: WritePolicy = "write_through", workers: int = 2
) -> tuple[CacheEngine, DiskTier, TieredStore]:
    engine = CacheEngine(pages * PAGE, PAGE, pin_memory=False)
    engine.promotion_wait_secs = 10.0
    disk = DiskTier(root, 64 * 1024**2, workers=workers)
    store = TieredStore([disk], write_policy=policy)
    store.attach(engine)
    return engine, disk, store


def read(engine: CacheEngine, key: bytes) -> torch.Tensor | None:
    out = torch.zeros(CHUNK, dtype=torch.uint8)
    return out if engine.get(key, out) else None  # type: ignore[arg-type]


def test_write_through_then_promotion_after_l1_loss(tmp_path: Path) -> None:
    engine, disk, store = engine_with_disk(tmp_path)
    keys = make_keys(4)
    for key in keys:
        engine.put(key, payload_for(key, CHUNK))
    assert store.flush(30)
    assert set(disk.indexed_keys()) == set(keys)
    assert engine.clear() == 4

    result = engine.lookup(keys)
    assert result.hits == 4
    pinned = engine.pin(keys)  # waits for the promotions
    assert [p.key for p in pinned] == keys
    for item in pinned:
        out = torch.zeros(CHUNK, dtype=torch.uint8)
        item.span.read_into([out])
        assert torch.equal(out, payload_for(item.key, CHUNK))
    engine.unpin(pinned)
    stats = engine.stats()
    assert stats.lower_hit_keys == 4 and stats.promotions == 4
    assert stats.stores == 4  # promotions are not counted as stores
    assert store.flush(30)
    assert disk.stats().stores == 4  # promoted chunks are not written back down
    assert engine.lookup(keys).hits == 4 and engine.stats().lower_hit_keys == 4  # now in L1


def test_lookup_continues_from_l1_prefix_into_disk(tmp_path: Path) -> None:
    engine, _disk, store = engine_with_disk(tmp_path, pages=32)
    keys = make_keys(6)
    for key in keys:
        engine.put(key, payload_for(key, CHUNK))
    assert store.flush(30)
    for key in keys[3:]:
        assert engine.remove(key)
    assert engine.lookup(keys).hits == 6
    for key in keys:
        out = read(engine, key)
        assert out is not None and torch.equal(out, payload_for(key, CHUNK))
    assert engine.stats().lower_hit_keys == 3


def test_gap_on_every_tier_ends_the_prefix(tmp_path: Path) -> None:
    engine, disk, store = engine_with_disk(tmp_path)
    keys = make_keys(4)
    for key in keys:
        engine.put(key, payload_for(key, CHUNK))
    assert store.flush(30)
    engine.clear()
    disk.remove(keys[2])
    assert engine.lookup(keys).hits == 2


def test_lock_protects_promoted_entries(tmp_path: Path) -> None:
    engine, _disk, store = engine_with_disk(tmp_path, pages=8)  # room for 2 chunks
    keys = make_keys(2)
    for key in keys:
        engine.put(key, payload_for(key, CHUNK))
    assert store.flush(30)
    engine.clear()
    result = engine.lookup(keys, lock=True, owner="w1")
    assert result.hits == 2 and result.lock_id is not None
    others = make_keys(3, "other")
    for key in others:  # no room: the locked promotions must not be evicted
        engine.put(key, payload_for(key, CHUNK))
    pinned = engine.pin(keys)
    assert len(pinned) == 2
    engine.unpin(pinned)
    assert engine.unlock(result.lock_id)


def test_corrupt_file_fails_promotion_cleanly(tmp_path: Path) -> None:
    engine, disk, store = engine_with_disk(tmp_path)
    keys = make_keys(3)
    for key in keys:
        engine.put(key, payload_for(key, CHUNK))
    assert store.flush(30)
    engine.clear()
    path = disk.path_for(keys[1])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert engine.lookup(keys).hits == 3  # the index does not know yet
    pinned = engine.pin(keys)
    assert [p.key for p in pinned] == keys[:1]  # never the corrupt bytes
    engine.unpin(pinned)
    assert engine.stats().promotion_failures == 1
    assert disk.stats().corrupt == 1
    assert not path.exists()
    assert engine.lookup(keys).hits == 1  # the corrupt chunk left the disk index


def test_pin_waits_a_bounded_time_for_a_stuck_promotion(tmp_path: Path) -> None:
    engine, disk, store = engine_with_disk(tmp_path, workers=1)
    engine.promotion_wait_secs = 0.3
    key = make_keys(1)[0]
    engine.put(key, payload_for(key, CHUNK))
    assert store.flush(30)
    engine.clear()
    gate = threading.Event()
    disk.pool.submit(Priority.PREFETCH, lambda: gate.wait(30))  # the disk is "stuck"
    assert engine.lookup([key]).hits == 1
    assert engine.pin([key]) == []  # gave up after the bound
    gate.set()
    assert store.flush(30)
    out = read(engine, key)
    assert out is not None and torch.equal(out, payload_for(key, CHUNK))


def test_promotion_without_room_in_l1_is_not_a_hit(tmp_path: Path) -> None:
    engine, _disk, store = engine_with_disk(tmp_path, pages=4)  # one chunk fits
    keys = make_keys(2)
    for key in keys:
        engine.put(key, payload_for(key, CHUNK))
    assert store.flush(30)
    engine.clear()
    blocker = make_keys(1, "blocker")[0]
    engine.put(blocker, payload_for(blocker, CHUNK))
    assert store.flush(30)
    pinned = engine.pin([blocker])  # L1 full of a pinned entry
    assert engine.lookup(keys).hits == 0
    engine.unpin(pinned)
    assert engine.lookup(keys).hits == 1  # room for one now


def test_write_on_evict_writes_only_evicted_chunks(tmp_path: Path) -> None:
    engine, disk, store = engine_with_disk(tmp_path, pages=8, policy="write_on_evict")
    keys = make_keys(4)
    for key in keys:
        engine.put(key, payload_for(key, CHUNK))
    assert store.flush(30)
    assert set(disk.indexed_keys()) == set(keys[:2])  # the two evicted ones
    assert engine.lookup(keys).hits == 2  # L1 holds two chunks: promotions evict the others
    assert store.flush(30)
    assert set(disk.indexed_keys()) == set(keys)  # ... which were written down on eviction
    for key in keys:
        assert engine.lookup([key]).hits == 1
        out = read(engine, key)
        assert out is not None and torch.equal(out, payload_for(key, CHUNK))
    assert disk.stats().stores == 4  # promoted chunks were not written again


def test_states_never_leak_after_promotions(tmp_path: Path) -> None:
    engine, _disk, store = engine_with_disk(tmp_path, pages=64)
    keys = make_keys(10)
    for key in keys:
        engine.put(key, payload_for(key, CHUNK))
    assert store.flush(30)
    engine.clear()
    threads = [threading.Thread(target=lambda: engine.unpin(engine.pin(keys))) for _ in range(4)]
    engine.lookup(keys)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert store.flush(30)
    stats = engine.stats()
    assert stats.pinned_entries == 0 and stats.active_locks == 0
    assert all(e.state is EntryState.READY for e in engine._index.values())
    assert stats.entries == 10 and stats.promotions == 10


def test_build_engine_restart_keeps_the_disk_cache(tmp_path: Path) -> None:
    config = load_config(
        {
            "max_local_cpu_size": 0.01,
            "l1_page_size": PAGE,
            "local_disk": f"file://{tmp_path}/cache/",
            "max_local_disk_size": 0.05,
        },
        environ={},
    )
    first = build_engine(config)
    keys = make_keys(3)
    for key in keys:
        first.put(key, payload_for(key, CHUNK))
    first.close()  # drains the write queue, releases the directory

    second = build_engine(config)
    assert second.lookup(keys).hits == 3
    for key in keys:
        out = read(second, key)
        assert out is not None and torch.equal(out, payload_for(key, CHUNK))
    assert second.tier_stats()["disk"]["entries"] == 3
    second.close()


def test_engine_without_tiers_reports_none() -> None:
    engine = CacheEngine(4 * PAGE, PAGE, pin_memory=False)
    assert engine.tier_stats() == {}
    engine.close()


@pytest.mark.parametrize("policy", ["write_through", "write_on_evict"])
def test_bad_policy_is_refused(policy: str, tmp_path: Path) -> None:
    TieredStore([], write_policy=policy)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="write_policy"):
        TieredStore([], write_policy="write_back")  # type: ignore[arg-type]


def test_tier_metrics_are_exported(tmp_path: Path) -> None:
    from lmcache_node.tiers.metrics import TierCollector
    from prometheus_client import CollectorRegistry, generate_latest

    engine, disk, store = engine_with_disk(tmp_path)
    key = make_keys(1)[0]
    engine.put(key, payload_for(key, CHUNK))
    assert store.flush(30)
    engine.clear()
    assert engine.lookup([key]).hits == 1
    engine.unpin(engine.pin([key]))
    registry = CollectorRegistry()
    registry.register(TierCollector(engine))
    text = generate_latest(registry).decode()
    assert 'lmcache_node_tier_available{tier="disk"} 1.0' in text
    assert 'lmcache_node_tier_stores_total{tier="disk"} 1.0' in text
    assert 'lmcache_node_tier_hits_total{tier="disk"} 1.0' in text
    assert "lmcache_node_tier_promotions_total 1.0" in text
    assert f'lmcache_node_tier_used_bytes{{tier="disk"}} {float(disk.stats().used_bytes)}' in text


def test_slow_tier_pins_at_most_a_share_of_l1(tmp_path: Path) -> None:
    engine, disk, store = engine_with_disk(tmp_path, pages=32, workers=1)
    gate = threading.Event()
    disk.pool.submit(Priority.PREFETCH, lambda: gate.wait(30))  # the disk is "stuck"
    keys = make_keys(6)
    for key in keys:
        engine.put(key, payload_for(key, CHUNK))
    pinned_bytes = engine.stats().pinned_entries * CHUNK
    assert pinned_bytes <= 32 * PAGE // 4  # the rest waits in staging copies, not in L1
    assert store.tier_stats()["tiering"]["staged_writes"] >= 1
    gate.set()
    assert store.flush(30)
    assert set(disk.indexed_keys()) == set(keys)  # nothing was lost
    assert engine.stats().pinned_entries == 0
    assert store.tier_stats()["tiering"]["write_pinned_bytes"] == 0
    assert store.tier_stats()["tiering"]["staged_bytes"] == 0
