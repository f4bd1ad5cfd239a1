"""Scenario tests of the L1 engine with tiny capacities."""

import random
import threading

import pytest
import torch
from lmcache_node.assembly import build_engine
from lmcache_node.config import load_config
from lmcache_node.engine import CacheEngine, LRUPolicy, StoreOutcome, copy_stream
from lmcache_node.engine.memory import as_bytes
from lmcache_node.keys import ChunkKey, KeyNamespace, chunk_keys

PAGE = 64


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "little"))


def payload(i: int, nbytes: int = PAGE) -> torch.Tensor:
    return torch.full((nbytes,), i % 251, dtype=torch.uint8)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def engine_of(pages: int, clock: FakeClock | None = None) -> CacheEngine:
    return CacheEngine(pages * PAGE, PAGE, clock=clock or FakeClock(), pin_memory=False)


def test_store_is_visible_to_lookup_as_soon_as_put_returns() -> None:
    engine = engine_of(4)
    assert engine.put(key(1), payload(1)) is StoreOutcome.RESERVED
    assert engine.lookup([key(1)]).hits == 1
    out = torch.empty(PAGE, dtype=torch.uint8)
    assert engine.get(key(1), out)
    assert torch.equal(out, payload(1))


def test_reserved_but_uncommitted_entries_are_invisible() -> None:
    engine = engine_of(4)
    outcome, reservation = engine.reserve(key(1), PAGE)
    assert outcome is StoreOutcome.RESERVED and reservation is not None
    assert engine.lookup([key(1)]).hits == 0
    assert engine.pin([key(1)]) == []
    reservation.span.write([payload(1)])
    engine.commit(reservation)
    assert engine.lookup([key(1)]).hits == 1


def test_lookup_counts_leading_hits_only() -> None:
    engine = engine_of(8)
    for i in (1, 2, 4):
        engine.put(key(i), payload(i))
    assert engine.lookup([key(1), key(2), key(3), key(4)]).hits == 2
    assert engine.lookup([key(3), key(1)]).hits == 0


def test_concurrent_duplicate_store_is_skipped() -> None:
    engine = engine_of(4)
    _, first = engine.reserve(key(1), PAGE)
    outcome, second = engine.reserve(key(1), PAGE)
    assert outcome is StoreOutcome.DUPLICATE and second is None
    assert first is not None
    engine.commit(first)
    assert engine.put(key(1), payload(1)) is StoreOutcome.DUPLICATE
    assert engine.stats().duplicates == 2


def test_failed_store_releases_its_reservation() -> None:
    engine = engine_of(2)
    _, reservation = engine.reserve(key(1), 2 * PAGE)
    assert reservation is not None and engine.pool.free_pages == 0
    engine.abort(reservation)
    assert engine.pool.free_pages == 2
    assert engine.lookup([key(1)]).hits == 0
    assert engine.put(key(1), payload(1, 2 * PAGE)) is StoreOutcome.RESERVED


def test_put_that_raises_aborts() -> None:
    engine = engine_of(2)
    too_big = torch.zeros(3 * PAGE, dtype=torch.uint8)
    _, reservation = engine.reserve(key(1), PAGE)
    assert reservation is not None
    with pytest.raises(ValueError):
        reservation.span.write([too_big])
    engine.abort(reservation)
    assert engine.pool.free_pages == 2


def test_lru_eviction_order_and_access_refresh() -> None:
    engine = engine_of(3)
    for i in (1, 2, 3):
        engine.put(key(i), payload(i))
    engine.lookup([key(1)])  # 1 becomes most recent: 2 is now the oldest
    engine.put(key(4), payload(4))
    assert engine.lookup([key(2)]).hits == 0
    assert all(engine.lookup([key(i)]).hits == 1 for i in (1, 3, 4))
    assert engine.stats().evictions == 1


def test_pinned_entries_are_never_evicted_and_no_space_is_a_result() -> None:
    engine = engine_of(2)
    engine.put(key(1), payload(1))
    engine.put(key(2), payload(2))
    pins = engine.pin([key(1), key(2)])
    assert len(pins) == 2
    assert engine.put(key(3), payload(3)) is StoreOutcome.NO_SPACE
    assert engine.lookup([key(1), key(2)]).hits == 2  # nothing was evicted
    engine.unpin(pins)
    assert engine.put(key(3), payload(3)) is StoreOutcome.RESERVED


def test_no_partial_eviction_when_space_cannot_be_made() -> None:
    engine = engine_of(3)
    for i in (1, 2, 3):
        engine.put(key(i), payload(i))
    pins = engine.pin([key(2)])
    # needs 3 pages; only 2 are evictable: evict nothing
    assert engine.put(key(9), payload(9, 3 * PAGE)) is StoreOutcome.NO_SPACE
    assert engine.lookup([key(1)]).hits == 1 and engine.lookup([key(3)]).hits == 1
    engine.unpin(pins)


def test_locked_entries_survive_eviction_until_unlock() -> None:
    engine = engine_of(2)
    engine.put(key(1), payload(1))
    engine.put(key(2), payload(2))
    result = engine.lookup([key(1), key(2)], lock=True, lock_ttl=10)
    assert result.hits == 2 and result.lock_id is not None
    assert engine.put(key(3), payload(3)) is StoreOutcome.NO_SPACE
    assert engine.unlock(result.lock_id)
    assert not engine.unlock(result.lock_id)
    assert engine.put(key(3), payload(3)) is StoreOutcome.RESERVED


def test_lock_ttl_expires_so_a_crashed_client_cannot_pin_memory_forever() -> None:
    clock = FakeClock()
    engine = engine_of(1, clock)
    engine.put(key(1), payload(1))
    lock = engine.lookup([key(1)], lock=True, lock_ttl=5).lock_id
    assert lock is not None
    clock.now = 4.9
    assert engine.put(key(2), payload(2)) is StoreOutcome.NO_SPACE
    clock.now = 5.0
    assert engine.put(key(2), payload(2)) is StoreOutcome.RESERVED
    assert engine.stats().expired_locks == 1
    assert not engine.unlock(lock)


def test_default_lock_ttl_applies() -> None:
    clock = FakeClock()
    engine = CacheEngine(PAGE, PAGE, clock=clock, default_lock_ttl=2.0, pin_memory=False)
    engine.put(key(1), payload(1))
    engine.lookup([key(1)], lock=True)
    assert engine.stats().active_locks == 1
    clock.now = 2.5
    assert engine.stats().active_locks == 0


def test_unlock_owner_releases_every_lock_of_a_session() -> None:
    engine = engine_of(4)
    engine.put(key(1), payload(1))
    engine.lookup([key(1)], lock=True, owner="a")
    engine.lookup([key(1)], lock=True, owner="a")
    engine.lookup([key(1)], lock=True, owner="b")
    assert engine.unlock_owner("a") == 2
    assert engine.stats().active_locks == 1


def test_lookup_without_hits_takes_no_lock() -> None:
    engine = engine_of(1)
    assert engine.lookup([key(1)], lock=True).lock_id is None


def test_clear_frees_pinned_entries_after_their_reader_finishes() -> None:
    engine = engine_of(2)
    engine.put(key(1), payload(1))
    engine.put(key(2), payload(2))
    pins = engine.pin([key(1)])
    assert engine.clear() == 2
    assert engine.lookup([key(1)]).hits == 0
    assert engine.pool.free_pages == 1  # key 1's page still being read
    out = torch.empty(PAGE, dtype=torch.uint8)
    pins[0].span.read_into([out])
    assert torch.equal(out, payload(1))
    engine.unpin(pins)
    assert engine.pool.free_pages == 2


def test_clear_while_writing_drops_the_write() -> None:
    engine = engine_of(2)
    _, reservation = engine.reserve(key(1), PAGE)
    assert reservation is not None
    engine.clear()
    engine.commit(reservation)
    assert engine.pool.free_pages in (1, 2)
    engine.put(key(2), payload(2))
    assert engine.stats().used_bytes <= engine.pool.capacity_bytes


def test_too_large_and_disabled() -> None:
    engine = engine_of(2)
    assert engine.put(key(1), payload(1, 3 * PAGE)) is StoreOutcome.TOO_LARGE
    disabled = CacheEngine(0, PAGE, pin_memory=False)
    assert disabled.put(key(1), payload(1)) is StoreOutcome.DISABLED


def test_multi_page_entries_round_trip_across_fragmented_pages() -> None:
    engine = engine_of(8)
    for i in range(8):
        engine.put(key(i), payload(i))
    for i in (1, 3, 5):  # free scattered pages
        assert engine.remove(key(i))
    data = torch.randint(0, 255, (3 * PAGE - 7,), dtype=torch.uint8)
    assert engine.put(key(100), data) is StoreOutcome.RESERVED
    out = torch.empty_like(data)
    assert engine.get(key(100), out)
    assert torch.equal(out, data)


def test_copy_stream_splits_sources_across_destinations() -> None:
    srcs = [torch.arange(i * 10, i * 10 + 10, dtype=torch.uint8) for i in range(3)]
    dsts = [torch.empty(7, dtype=torch.uint8), torch.empty(23, dtype=torch.uint8)]
    assert copy_stream(dsts, srcs) == 30
    assert torch.equal(torch.cat(dsts), torch.cat(srcs))
    with pytest.raises(ValueError, match="exceed"):
        copy_stream([torch.empty(5, dtype=torch.uint8)], srcs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "spec",
    ["(2,2,256,4,16):float16:2", "(3,2,256,4,4):float32:3", "(2,1,256,1,64):bfloat16:2"],
)
def test_byte_exact_round_trips_for_standalone_layouts(dtype: torch.dtype, spec: str) -> None:
    config = load_config(
        {"kvcache_shape_spec": spec, "max_local_cpu_size": "8Mi", "l1_page_size": "64Ki"},
        environ={},
    )
    engine = build_engine(config)
    generator = torch.Generator().manual_seed(1)
    for index, group in enumerate(config.layer_groups()):
        data = torch.randn(group.shape, generator=generator).to(dtype)
        data.view(-1)[0] = float("nan") if dtype != torch.uint8 else 0  # NaN bits survive
        namespace = KeyNamespace(model_name="m", kv_dtype=str(dtype), layout=f"g{index}")
        (chunk_key,) = chunk_keys(list(range(256)), 256, namespace)
        assert engine.put(chunk_key, data) is StoreOutcome.RESERVED
        out = torch.empty_like(data)
        assert engine.get(chunk_key, out)
        assert torch.equal(as_bytes(out), as_bytes(data))


def test_concurrent_stores_and_retrieves_from_many_threads() -> None:
    engine = engine_of(32)
    errors: list[str] = []
    barrier = threading.Barrier(6)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        for _ in range(300):
            i = rng.randrange(64)
            nbytes = PAGE * rng.choice((1, 2))
            data = payload(i, nbytes)
            outcome = engine.put(key(i * 10 + nbytes // PAGE), data)
            if outcome not in (
                StoreOutcome.RESERVED,
                StoreOutcome.DUPLICATE,
                StoreOutcome.NO_SPACE,
            ):
                errors.append(f"unexpected {outcome}")
            pins = engine.pin([key(i * 10 + nbytes // PAGE)])
            if pins:
                out = torch.empty(pins[0].span.nbytes, dtype=torch.uint8)
                pins[0].span.read_into([out])
                engine.unpin(pins)
                if not torch.equal(out, payload(i, out.numel())):
                    errors.append(f"corrupt bytes for key {i}")
            if rng.random() < 0.2:
                result = engine.lookup([key(i * 10 + 1)], lock=True, lock_ttl=1)
                if result.lock_id is not None:
                    engine.unlock(result.lock_id)
            stats = engine.stats()
            if stats.used_bytes > stats.capacity_bytes:
                errors.append("over capacity")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:5]
    stats = engine.stats()
    assert stats.pinned_entries == 0 and stats.active_locks == 0
    used_pages = sum(len(p.span.pages) for p in engine.pin(engine.keys()))
    assert used_pages + engine.pool.free_pages == engine.pool.num_pages


def test_policy_is_pluggable() -> None:
    class MRU(LRUPolicy):
        def candidates(self):  # type: ignore[no-untyped-def]
            return reversed(list(super().candidates()))

    engine = CacheEngine(2 * PAGE, PAGE, policy=MRU(), pin_memory=False)
    engine.put(key(1), payload(1))
    engine.put(key(2), payload(2))
    engine.put(key(3), payload(3))
    assert engine.lookup([key(1)]).hits == 1
    assert engine.lookup([key(2)]).hits == 0
