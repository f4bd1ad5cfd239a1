# Long on purpose, for now: the L1 index, store/retrieve and locks share one lock and one
# page allocator; the L1-pool work (h/persist) reshapes this module, so it is not split here.
"""The cache engine: L1 index over the memory pool, with reservations, pins and locks.

Thread-safe: one lock guards the index; byte copies run outside it. A store is a
reserve -> write -> commit sequence (a concurrent duplicate store is skipped, a failed one
aborts and releases its pages); a retrieve pins entries so they cannot be evicted mid-copy;
a lookup may lock its hits for a TTL so they survive until the retrieve comes. With a
journal (a pool in shared memory, ``engine/journal.py``) every commit is recorded after the
bytes and every removal withdrawn before its pages are reused, so a restarted server can
``adopt`` what was committed.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lmcache_node.engine.memory import MemoryPool, PageSpan, as_bytes
from lmcache_node.engine.policy import EvictionPolicy, LRUPolicy
from lmcache_node.engine.types import (
    EntryState,
    ForeignLockError,
    LockLimitError,
    PoolState,
    StoreOutcome,
)
from lmcache_node.keys import ChunkKey

log = logging.getLogger(__name__)

EvictListener = Callable[[ChunkKey, PageSpan], None]
CommitListener = Callable[[ChunkKey, PageSpan], None]
ClearListener = Callable[[], None]
_VISIBLE = (EntryState.READY, EntryState.PROMOTING)  # what a lookup counts as a hit


@dataclass(eq=False)
class Entry:
    key: ChunkKey
    span: PageSpan
    state: EntryState = EntryState.WRITING
    pins: int = 0
    locks: int = 0
    detached: bool = False  # removed from the index; pages freed when the last pin goes

    @property
    def evictable(self) -> bool:
        return self.state is EntryState.READY and self.pins == 0 and self.locks == 0


@dataclass(frozen=True)
class Reservation:
    """Pages reserved for one key; write into ``span`` then commit or abort."""

    key: ChunkKey
    span: PageSpan
    entry: Entry = field(repr=False)


@dataclass(frozen=True)
class Pinned:
    """A committed entry held for reading; release with ``CacheEngine.unpin``."""

    key: ChunkKey
    span: PageSpan
    entry: Entry = field(repr=False)


@dataclass(frozen=True)
class LookupResult:
    hits: int  # leading keys found
    lock_id: int | None = None


@dataclass
class _Lock:
    lock_id: int
    entries: list[Entry]
    expires_at: float
    owner: str


@dataclass
class EngineStats:
    capacity_bytes: int = 0
    used_bytes: int = 0
    page_size: int = 0
    free_pages: int = 0
    entries: int = 0
    lookups: int = 0
    lookup_keys: int = 0
    hit_keys: int = 0
    stores: int = 0
    stored_bytes: int = 0
    duplicates: int = 0
    no_space: int = 0
    aborted: int = 0
    retrieves: int = 0
    retrieved_bytes: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    active_locks: int = 0
    expired_locks: int = 0
    pinned_entries: int = 0
    lower_hit_keys: int = 0  # lookup hits found below L1 (being promoted)
    promotions: int = 0
    promoted_bytes: int = 0
    promotion_failures: int = 0
    adopted_entries: int = 0  # chunks taken over from the pool a previous server left
    adopted_bytes: int = 0


class IndexJournal(Protocol):
    """The durable index of a persistent pool (``lmcache_node.engine.journal.PoolJournal``)."""

    def committed(self, key: ChunkKey, pages: Sequence[int], nbytes: int) -> None:
        """Record an entry whose bytes are complete (called under the engine's lock)."""
        ...

    def removed(self, pages: Sequence[int]) -> None:
        """Withdraw an entry before its pages can be reused (under the engine's lock)."""
        ...


class LowerTiers(Protocol):
    """The tiers below L1 as the engine sees them (``lmcache_node.tiers.TieredStore``)."""

    def locate(self, keys: Sequence[ChunkKey]) -> list[tuple[int, int]]:
        """(tier index, bytes) of the leading ``keys`` held below L1."""
        ...

    def promote(self, engine: CacheEngine, items: Sequence[tuple[Reservation, int]]) -> None:
        """Fill the PROMOTING reservations from the named tiers, then commit or abort each."""
        ...

    def tier_stats(self) -> dict[str, dict[str, float | int | bool | str]]: ...

    def close(self) -> None: ...


class CacheEngine:
    """The in-process engine (L1 memory tier); lower tiers attach through listeners."""

    def __init__(
        self,
        capacity_bytes: int,
        page_size: int = 1024**2,
        *,
        policy: EvictionPolicy | None = None,
        pin_memory: bool | None = None,
        backing: torch.Tensor | None = None,
        journal: IndexJournal | None = None,
        pool_state: PoolState | None = None,
        default_lock_ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = MemoryPool(capacity_bytes, page_size, pin_memory=pin_memory, backing=backing)
        self.journal = journal
        self.pool_state = pool_state or PoolState(
            "anonymous" if self.pool.num_pages else "disabled"
        )
        self.policy: EvictionPolicy = policy or LRUPolicy()
        self.default_lock_ttl = default_lock_ttl
        self._clock = clock
        self._mutex = threading.Lock()
        self._index: dict[ChunkKey, Entry] = {}
        self._locks: dict[int, _Lock] = {}
        self._owner_locks: dict[str, int] = {}  # locks held per owner (bounded by the caller)
        self._lock_expiry: list[tuple[float, int]] = []
        self._lock_ids = itertools.count(1)
        self._stats = EngineStats(
            capacity_bytes=self.pool.capacity_bytes, page_size=self.pool.page_size
        )
        self.evict_listeners: list[EvictListener] = []
        self.commit_listeners: list[CommitListener] = []
        self.clear_listeners: list[ClearListener] = []  # after clear() (e.g. routing events)
        # Lower tiers (disk, remote) attach here; pin waits this long for a promotion.
        self.lower_tiers: LowerTiers | None = None
        self.promotion_wait_secs = 10.0
        self._state_changed = threading.Condition(self._mutex)

    # ----- lookups and locks -----
    def contains(self, key: ChunkKey) -> bool:
        with self._mutex:
            entry = self._index.get(key)
            return entry is not None and entry.state is EntryState.READY

    def lookup(
        self,
        keys: Sequence[ChunkKey],
        *,
        lock: bool = False,
        lock_ttl: float | None = None,
        owner: str = "",
        max_owner_locks: int | None = None,
    ) -> LookupResult:
        """Count the leading keys present; with ``lock``, hold them until unlock or TTL.

        With lower tiers attached the count goes on below L1: those keys get L1 pages
        reserved (PROMOTING) and are filled in the background; ``pin`` waits for them.
        ``max_owner_locks`` bounds the locks ``owner`` holds: ``LockLimitError`` beyond it.
        """
        with self._mutex:
            self._expire_locks_locked()
            held_now = self._owner_locks.get(owner, 0)
            if lock and max_owner_locks is not None and held_now >= max_owner_locks:
                raise LockLimitError(held_now, max_owner_locks)
            found: list[Entry] = []
            for key in keys:
                entry = self._index.get(key)
                if entry is None or entry.state not in _VISIBLE:
                    break
                found.append(entry)
                self.policy.accessed(key)
            self._stats.lookups += 1
            self._stats.lookup_keys += len(keys)
            self._stats.hit_keys += len(found)
            lower = self.lower_tiers
            if lower is None or len(found) == len(keys):
                return self._lock_entries_locked(found, lock, lock_ttl, owner)
            for entry in found:  # hold them: promotions below must not evict them
                entry.locks += 1
        try:
            promoted = self._reserve_promotions(lower, keys[len(found) :])
        except Exception:  # a tier bug must not fail the lookup or leak the holds
            log.exception("lower-tier lookup failed; answering from L1 only")
            promoted = []
        if promoted:
            lower.promote(self, promoted)
        with self._mutex:
            held = found + [reservation.entry for reservation, _ in promoted]
            entries = list(itertools.takewhile(lambda e: not e.detached, held))
            result = self._lock_entries_locked(entries, lock, lock_ttl, owner)
            for entry in held:  # drop the holds (the lookup lock, if any, now protects them)
                entry.locks -= 1
            return result

    def _lock_entries_locked(
        self, entries: list[Entry], lock: bool, lock_ttl: float | None, owner: str
    ) -> LookupResult:
        if not lock or not entries:
            return LookupResult(hits=len(entries))
        lock_id = next(self._lock_ids)
        ttl = self.default_lock_ttl if lock_ttl is None else lock_ttl
        expires = self._clock() + ttl
        for entry in entries:
            entry.locks += 1
        self._locks[lock_id] = _Lock(lock_id, entries, expires, owner)
        self._owner_locks[owner] = self._owner_locks.get(owner, 0) + 1
        heapq.heappush(self._lock_expiry, (expires, lock_id))
        return LookupResult(hits=len(entries), lock_id=lock_id)

    def _reserve_promotions(
        self, lower: LowerTiers, keys: Sequence[ChunkKey]
    ) -> list[tuple[Reservation, int]]:
        """Reserve held PROMOTING entries for the leading ``keys`` the lower tiers hold."""
        located = lower.locate(keys)  # may take a network round trip: outside the lock
        reserved: list[tuple[Reservation, int]] = []
        if not located:
            return reserved
        with self._mutex:
            for key, (tier, nbytes) in zip(keys, located, strict=False):
                reservation = self._reserve_promotion_locked(key, nbytes)
                if reservation is None:
                    break
                reservation.entry.locks += 1  # held until the lookup returns
                reserved.append((reservation, tier))
            self._stats.lower_hit_keys += len(reserved)
        return reserved

    def _reserve_promotion_locked(self, key: ChunkKey, nbytes: int) -> Reservation | None:
        npages = self.pool.pages_for(nbytes)
        if self.pool.num_pages == 0 or npages > self.pool.num_pages or key in self._index:
            return None
        pages = self.pool.alloc(npages)
        if pages is None and self._evict_locked(npages):
            pages = self.pool.alloc(npages)
        if pages is None:
            self._stats.no_space += 1
            return None
        entry = Entry(key=key, span=self.pool.span(pages, nbytes), state=EntryState.PROMOTING)
        self._index[key] = entry
        return Reservation(key, entry.span, entry)

    def unlock(self, lock_id: int) -> bool:
        """Release a lookup lock; False if it was unknown or already expired."""
        with self._mutex:
            return self._release_lock_locked(lock_id)

    def unlock_owned(self, lock_ids: Iterable[int], owner: str) -> int:
        """Release ``owner``'s locks among ``lock_ids``; unknown (expired) ids are skipped.

        All or nothing: if any id belongs to another owner, ``ForeignLockError`` and no lock
        is released.
        """
        ids = list(lock_ids)
        with self._mutex:
            foreign = [i for i in ids if i in self._locks and self._locks[i].owner != owner]
            if foreign:
                raise ForeignLockError(foreign)
            return sum(1 for lock_id in ids if self._release_lock_locked(lock_id))

    def owner_lock_count(self, owner: str) -> int:
        with self._mutex:
            return self._owner_locks.get(owner, 0)

    def unlock_owner(self, owner: str) -> int:
        """Release every lock taken by ``owner`` (a session that ended or died)."""
        with self._mutex:
            ids = [lock.lock_id for lock in self._locks.values() if lock.owner == owner]
            for lock_id in ids:
                self._release_lock_locked(lock_id)
            return len(ids)

    def expire_locks(self) -> int:
        with self._mutex:
            return self._expire_locks_locked()

    def _release_lock_locked(self, lock_id: int) -> bool:
        record = self._locks.pop(lock_id, None)
        if record is None:
            return False
        remaining = self._owner_locks.get(record.owner, 0) - 1
        if remaining > 0:
            self._owner_locks[record.owner] = remaining
        else:
            self._owner_locks.pop(record.owner, None)
        for entry in record.entries:
            entry.locks -= 1
        return True

    def _expire_locks_locked(self) -> int:
        now = self._clock()
        expired = 0
        while self._lock_expiry and self._lock_expiry[0][0] <= now:
            _, lock_id = heapq.heappop(self._lock_expiry)
            if self._release_lock_locked(lock_id):
                expired += 1
        if expired:
            self._stats.expired_locks += expired
            log.debug("expired %d lookup lock(s)", expired)
        return expired

    # ----- stores -----
    def reserve(self, key: ChunkKey, nbytes: int) -> tuple[StoreOutcome, Reservation | None]:
        """Reserve pages for ``key``; evicts unpinned, unlocked entries when needed."""
        if self.pool.num_pages == 0:
            return StoreOutcome.DISABLED, None
        npages = self.pool.pages_for(nbytes)
        if npages > self.pool.num_pages:
            return StoreOutcome.TOO_LARGE, None
        with self._mutex:
            self._expire_locks_locked()
            if key in self._index:
                self._stats.duplicates += 1
                return StoreOutcome.DUPLICATE, None
            pages = self.pool.alloc(npages)
            if pages is None and self._evict_locked(npages):
                pages = self.pool.alloc(npages)
            if pages is None:
                self._stats.no_space += 1
                return StoreOutcome.NO_SPACE, None
            entry = Entry(key=key, span=self.pool.span(pages, nbytes))
            self._index[key] = entry
            return StoreOutcome.RESERVED, Reservation(key, entry.span, entry)

    def commit(self, reservation: Reservation) -> None:
        """Make a written reservation visible to lookups."""
        entry = reservation.entry
        with self._mutex:
            self._state_changed.notify_all()
            if entry.detached:  # cleared while being written: drop it
                self.pool.release(entry.span.pages)
                return
            if self.journal is not None:  # after the bytes (the caller wrote them)
                self.journal.committed(entry.key, entry.span.pages, entry.span.nbytes)
            promoted = entry.state is EntryState.PROMOTING
            entry.state = EntryState.READY
            self.policy.inserted(entry.key)
            if promoted:
                self._stats.promotions += 1
                self._stats.promoted_bytes += entry.span.nbytes
            else:
                self._stats.stores += 1
                self._stats.stored_bytes += entry.span.nbytes
            listeners = list(self.commit_listeners)
        for listener in listeners:
            listener(entry.key, entry.span)

    def abort(self, reservation: Reservation) -> None:
        """Give back a reservation whose write failed."""
        entry = reservation.entry
        with self._mutex:
            if not entry.detached:
                self._index.pop(entry.key, None)
            self.pool.release(entry.span.pages)
            entry.detached = True
            if entry.state is EntryState.PROMOTING:
                self._stats.promotion_failures += 1
            else:
                self._stats.aborted += 1
            self._state_changed.notify_all()

    def put(self, key: ChunkKey, data: torch.Tensor) -> StoreOutcome:
        """Store a contiguous tensor's bytes under ``key`` (reserve, copy, commit)."""
        src = as_bytes(data)
        outcome, reservation = self.reserve(key, src.numel())
        if reservation is None:
            return outcome
        try:
            reservation.span.write([src])
        except BaseException:
            self.abort(reservation)
            raise
        self.commit(reservation)
        return outcome

    def _evict_locked(self, npages: int) -> bool:
        """Evict in policy order until ``npages`` are free; evict nothing if that cannot be."""
        need = npages - self.pool.free_pages
        victims: list[Entry] = []
        for key in self.policy.candidates():
            entry = self._index.get(key)
            if entry is None or not entry.evictable:
                continue
            victims.append(entry)
            need -= len(entry.span.pages)
            if need <= 0:
                break
        if need > 0:
            return False
        for entry in victims:
            for listener in self.evict_listeners:
                listener(entry.key, entry.span)
            self._remove_locked(entry)
            self._stats.evictions += 1
            self._stats.evicted_bytes += entry.span.nbytes
        return True

    def _remove_locked(self, entry: Entry) -> None:
        self._index.pop(entry.key, None)
        self.policy.removed(entry.key)
        entry.detached = True
        if entry.state is EntryState.READY:
            if self.journal is not None:  # before the pages can be handed out again
                self.journal.removed(entry.span.pages)
            if entry.pins == 0:
                self.pool.release(entry.span.pages)

    def adopt(self, entries: Iterable[tuple[ChunkKey, Sequence[int], int]]) -> int:
        """Index committed entries a previous server left in this pool, oldest first
        (``PoolJournal.scan``): their pages are taken, lookups find them. Returns how many."""
        with self._mutex:
            if self._index:
                raise RuntimeError("adopt() fills an empty engine at start-up only")
            taken: list[int] = []
            for key, pages, nbytes in entries:
                if key in self._index:  # not with a sound journal: keep one, withdraw this
                    if self.journal is not None:
                        self.journal.removed(pages)
                    continue
                entry = Entry(key, self.pool.span(list(pages), nbytes), EntryState.READY)
                self._index[key] = entry
                self.policy.inserted(key)
                taken.extend(pages)
                self._stats.adopted_entries += 1
                self._stats.adopted_bytes += nbytes
            self.pool.claim(taken)
            return self._stats.adopted_entries

    # ----- retrieves -----
    def pin(self, keys: Sequence[ChunkKey]) -> list[Pinned]:
        """Pin the leading committed entries of ``keys`` for reading.

        An entry still being promoted from a lower tier is waited for, at most
        ``promotion_wait_secs`` in all; one that fails or times out ends the prefix.
        """
        pinned: list[Pinned] = []
        deadline: float | None = None
        with self._mutex:
            for key in keys:
                entry = self._index.get(key)
                while entry is not None and entry.state is EntryState.PROMOTING:
                    if deadline is None:
                        deadline = time.monotonic() + self.promotion_wait_secs
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._state_changed.wait(left)
                    entry = self._index.get(key)
                if entry is None or entry.state is not EntryState.READY:
                    break
                entry.pins += 1
                self.policy.accessed(key)
                pinned.append(Pinned(key, entry.span, entry))
        return pinned

    def unpin(self, pinned: Iterable[Pinned], *, retrieved: bool = True) -> None:
        with self._mutex:
            for item in pinned:
                entry = item.entry
                entry.pins -= 1
                if retrieved:
                    self._stats.retrieves += 1
                    self._stats.retrieved_bytes += entry.span.nbytes
                if entry.detached and entry.pins == 0:
                    self.pool.release(entry.span.pages)

    def get(self, key: ChunkKey, out: torch.Tensor) -> bool:
        """Copy ``key``'s bytes into the contiguous tensor ``out``; False on a miss."""
        pinned = self.pin([key])
        if not pinned:
            return False
        try:
            dst = as_bytes(out)
            if dst.numel() != pinned[0].span.nbytes:
                raise ValueError(
                    f"out has {dst.numel()} bytes but the entry has {pinned[0].span.nbytes}"
                )
            pinned[0].span.read_into([dst])
        finally:
            self.unpin(pinned)
        return True

    # ----- admin -----
    def remove(self, key: ChunkKey) -> bool:
        with self._mutex:
            entry = self._index.get(key)
            if entry is None or entry.state is not EntryState.READY:
                return False
            self._remove_locked(entry)
            return True

    def clear(self) -> int:
        """Drop every committed entry (pinned ones are freed when their reader finishes)."""
        with self._mutex:
            entries = [e for e in self._index.values() if e.state is EntryState.READY]
            for entry in entries:
                self._remove_locked(entry)
            for lock_id in list(self._locks):
                self._release_lock_locked(lock_id)
            listeners = list(self.clear_listeners)
        for listener in listeners:
            listener()
        return len(entries)

    def stats(self) -> EngineStats:
        with self._mutex:
            self._expire_locks_locked()
            snapshot = EngineStats(**vars(self._stats))
            snapshot.free_pages = self.pool.free_pages
            snapshot.used_bytes = (self.pool.num_pages - self.pool.free_pages) * self.pool.page_size
            snapshot.entries = len(self._index)
            snapshot.active_locks = len(self._locks)
            snapshot.pinned_entries = sum(1 for e in self._index.values() if e.pins)
            return snapshot

    def tier_stats(self) -> dict[str, dict[str, float | int | bool | str]]:
        """Per-tier counters of the lower tiers (empty without them)."""
        return self.lower_tiers.tier_stats() if self.lower_tiers is not None else {}

    def close(self) -> None:
        """Finish queued lower-tier writes (bounded) and release the tiers."""
        lower = self.lower_tiers
        if lower is not None:
            lower.close()
            self.lower_tiers = None

    def keys(self) -> list[ChunkKey]:
        with self._mutex:
            return [k for k, e in self._index.items() if e.state is EntryState.READY]
