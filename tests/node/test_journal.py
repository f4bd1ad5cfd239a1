"""The L1 pool's durable index: header checks, commit records, and what a crash at each step
of a commit or a removal leaves for the next server (pure logic on an in-memory pool)."""

from __future__ import annotations

import struct

import pytest
import torch
from lmcache_node.engine import CacheEngine, StoreOutcome
from lmcache_node.engine.journal import (
    COMMITTED,
    END,
    HEADER_BYTES,
    SLOT_BYTES,
    IncompatiblePoolError,
    PoolGeometry,
    PoolJournal,
    foreign_header,
    read_header,
)
from lmcache_node.keys import ChunkKey

PAGE = 64
GEOMETRY = PoolGeometry(page_size=PAGE, num_pages=16, chunk_size=256, namespace="test-ns")


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "little"))


def payload(i: int, nbytes: int) -> torch.Tensor:
    return torch.arange(nbytes, dtype=torch.int64).add(i * 7).remainder(251).to(torch.uint8)


def fresh_pool(geometry: PoolGeometry = GEOMETRY) -> torch.Tensor:
    pool = torch.zeros(geometry.total_bytes, dtype=torch.uint8)
    PoolJournal(pool, geometry).format()
    return pool


def engine_on(pool: torch.Tensor, geometry: PoolGeometry = GEOMETRY) -> CacheEngine:
    """An engine over ``pool`` that adopts what the journal holds (a "restart")."""
    journal = PoolJournal(pool[: geometry.data_offset], geometry)
    entries = journal.scan().entries
    engine = CacheEngine(
        geometry.data_bytes, PAGE, backing=pool[geometry.data_offset :], journal=journal
    )
    engine.adopt((e.key, e.pages, e.nbytes) for e in entries)
    return engine


def slot(pool: torch.Tensor, head: int) -> torch.Tensor:
    start = GEOMETRY.slots_offset + SLOT_BYTES * head
    return pool[start : start + SLOT_BYTES]


def test_header_round_trip() -> None:
    assert read_header(GEOMETRY.header()) == GEOMETRY
    assert len(GEOMETRY.header()) == HEADER_BYTES
    assert GEOMETRY.data_offset % (2 * 1024**2) == 0


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda h: bytes(len(h)), "no header"),
        (lambda h: b"NOTAPOOL" + h[8:], "not an lmcache-node L1 pool"),
        (lambda h: h[:8] + struct.pack("<I", 2) + h[12:], "layout version is 2"),
        (lambda h: h[:24] + b"\x01" + h[25:], "damaged"),
    ],
)
def test_unusable_headers_say_why(damage: object, reason: str) -> None:
    header = damage(GEOMETRY.header())  # type: ignore[operator]
    with pytest.raises(IncompatiblePoolError, match=reason):
        read_header(header)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"chunk_size": 128}, "chunk size is 256, this server's is 128"),
        ({"page_size": 128}, "page size"),
        ({"num_pages": 32}, "page count"),
        ({"namespace": "other"}, "key namespace"),
    ],
)
def test_another_geometry_is_not_adopted(change: dict[str, object], reason: str) -> None:
    wanted = PoolGeometry(**{**vars(GEOMETRY), **change})  # type: ignore[arg-type]
    mismatch = wanted.mismatch(read_header(GEOMETRY.header()))
    assert mismatch is not None and reason in mismatch
    assert GEOMETRY.mismatch(read_header(GEOMETRY.header())) is None


def test_foreign_header_tells_our_pools_from_other_files() -> None:
    assert foreign_header(GEOMETRY.header()) is None
    assert foreign_header(bytes(64)) is None  # a creation that did not finish: ours
    assert foreign_header(b"#!/bin/sh\n") is not None


def test_committed_entries_come_back_byte_exact_in_commit_order() -> None:
    pool = fresh_pool()
    engine = engine_on(pool)
    sizes = {1: PAGE, 2: 3 * PAGE, 3: 2 * PAGE + 5, 4: 1}
    for i, nbytes in sizes.items():
        assert engine.put(key(i), payload(i, nbytes)) is StoreOutcome.RESERVED
    adopted = engine_on(pool)
    assert adopted.stats().adopted_entries == 4
    assert adopted.stats().adopted_bytes == sum(sizes.values())
    for i, nbytes in sizes.items():
        out = torch.empty(nbytes, dtype=torch.uint8)
        assert adopted.get(key(i), out) and torch.equal(out, payload(i, nbytes))
    # the free list holds exactly the pages nobody claimed
    used = sum(-(-n // PAGE) for n in sizes.values())
    assert adopted.pool.free_pages == GEOMETRY.num_pages - used
    # LRU order is commit order: the oldest goes first
    for i in range(10, 10 + adopted.pool.free_pages // 3 + 1):
        adopted.put(key(i), payload(i, 3 * PAGE))
    assert adopted.lookup([key(1)]).hits == 0 and adopted.lookup([key(4)]).hits == 1


def test_evictions_removals_and_clears_never_come_back() -> None:
    pool = fresh_pool()
    engine = engine_on(pool)
    for i in range(40):  # 16 pages, 2 per entry: most of these get evicted
        engine.put(key(i), payload(i, 2 * PAGE))
    engine.remove(key(39))
    resident = {i for i in range(40) if engine.contains(key(i))}
    assert len(resident) == 7 and engine.stats().evictions == 32
    adopted = engine_on(pool)
    assert {i for i in range(40) if adopted.contains(key(i))} == resident
    for i in resident:
        out = torch.empty(2 * PAGE, dtype=torch.uint8)
        assert adopted.get(key(i), out) and torch.equal(out, payload(i, 2 * PAGE))
    adopted.clear()
    assert engine_on(pool).stats().entries == 0


def test_an_entry_removed_while_pinned_is_withdrawn_at_once() -> None:
    pool = fresh_pool()
    engine = engine_on(pool)
    engine.put(key(1), payload(1, PAGE))
    pinned = engine.pin([key(1)])
    assert engine.remove(key(1))
    assert engine_on(pool.clone()).stats().entries == 0  # a crash now: gone
    engine.unpin(pinned)


def test_uncommitted_reservations_are_not_adopted() -> None:
    pool = fresh_pool()
    engine = engine_on(pool)
    _, reservation = engine.reserve(key(1), 2 * PAGE)
    assert reservation is not None
    reservation.span.write([payload(1, 2 * PAGE)])  # the bytes, but no commit: a crash here
    adopted = engine_on(pool)
    assert adopted.stats().entries == 0
    assert adopted.pool.free_pages == GEOMETRY.num_pages


def committed_pool() -> tuple[torch.Tensor, list[int]]:
    """A pool with one three-page entry (key 1) on pages that are not contiguous."""
    pool = fresh_pool()
    journal = PoolJournal(pool[: GEOMETRY.data_offset], GEOMETRY)
    pages = [5, 2, 9]
    journal.committed(key(1), pages, 3 * PAGE)
    return pool, pages


@pytest.mark.parametrize("written", [0, 1, 2, 3])
def test_a_commit_word_not_fully_written_is_no_commit(written: int) -> None:
    """A crash before (0) or while (1-3 bytes) writing the commit word, the last step."""
    pool, pages = committed_pool()
    word = slot(pool, pages[0])[:4]
    word.copy_(torch.tensor(list(COMMITTED.to_bytes(4, "little")[:written]) + [0] * (4 - written)))
    scan = PoolJournal(pool[: GEOMETRY.data_offset], GEOMETRY).scan()
    assert scan.entries == [] and scan.dropped == 0
    assert PoolJournal(committed_pool()[0][: GEOMETRY.data_offset], GEOMETRY).scan().entries


@pytest.mark.parametrize("offset", range(4, 48))
def test_a_torn_record_is_dropped_and_cleared(offset: int) -> None:
    pool, pages = committed_pool()
    slot(pool, pages[0])[offset] ^= 0x5A
    journal = PoolJournal(pool[: GEOMETRY.data_offset], GEOMETRY)
    scan = journal.scan()
    assert scan.entries == [] and scan.dropped == 1
    assert journal.scan().dropped == 0  # cleared: not reported twice


@pytest.mark.parametrize(
    "chain_change", [(2, 9999), (9, 3), (2, END)], ids=["out-of-range", "no-end", "short"]
)
def test_a_broken_chain_is_dropped(chain_change: tuple[int, int]) -> None:
    pool, _ = committed_pool()
    page, value = chain_change
    start = GEOMETRY.chain_offset + 4 * page
    pool[start : start + 4].copy_(torch.tensor(list(value.to_bytes(4, "little"))))
    scan = PoolJournal(pool[: GEOMETRY.data_offset], GEOMETRY).scan()
    assert scan.entries == [] and scan.dropped == 1


def test_two_records_claiming_one_page_are_both_dropped() -> None:
    pool, _ = committed_pool()
    journal = PoolJournal(pool[: GEOMETRY.data_offset], GEOMETRY)
    journal.committed(key(2), [7, 9], 2 * PAGE)  # page 9 is also key 1's
    journal.committed(key(3), [11], PAGE)
    scan = PoolJournal(pool[: GEOMETRY.data_offset], GEOMETRY).scan()
    assert [e.key for e in scan.entries] == [key(3)] and scan.dropped == 2


def test_pages_reused_after_an_eviction_never_revive_the_evicted_entry() -> None:
    """Evict, then crash while the pages' new owner is half committed: neither comes back."""
    pool = fresh_pool()
    journal = PoolJournal(pool[: GEOMETRY.data_offset], GEOMETRY)
    journal.committed(key(1), [4, 5], 2 * PAGE)
    journal.removed([4, 5])  # the eviction, before the pages are handed out
    snapshot = pool.clone()
    journal.committed(key(2), [4, 5], 2 * PAGE)  # the new owner's record, same chain...
    slot(pool, 4)[:4] = 0  # ...whose commit word the crash prevented
    for state in (snapshot, pool):
        assert PoolJournal(state[: GEOMETRY.data_offset], GEOMETRY).scan().entries == []


def test_keys_of_another_length_are_kept_in_memory_only() -> None:
    pool = fresh_pool()
    engine = engine_on(pool)
    engine.put(ChunkKey(b"short"), payload(1, PAGE))
    assert engine.contains(ChunkKey(b"short"))
    assert engine_on(pool).stats().entries == 0
