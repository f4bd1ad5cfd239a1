"""Tier policy: lookups continue below L1, lower hits are promoted, stores flow down.

``TieredStore.attach(engine)`` hooks the lower tiers into a ``CacheEngine``: the engine asks
``locate`` for the keys after its own prefix, reserves L1 pages for them (PROMOTING) and hands
the reservations to ``promote``, which fills them on the tiers' pools at prefetch priority.
Committed stores are written down asynchronously (write-through) or when L1 evicts them
(write-on-evict, from a bounded staging copy).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from typing import Literal

import torch

from lmcache_node.engine.core import CacheEngine, Pinned, Reservation
from lmcache_node.engine.memory import PageSpan
from lmcache_node.keys import ChunkKey
from lmcache_node.tiers.base import LowerTier, RateLimitedLog, StatValue
from lmcache_node.tiers.workers import Priority

log = logging.getLogger(__name__)

WritePolicy = Literal["write_through", "write_on_evict"]
MAX_ORIGINS = 1 << 16
PINNED_SHARE = 0.25  # at most this share of L1 held by write-through pins


class TieredStore:
    """The tiers below L1, in lookup order (disk before remote)."""

    def __init__(
        self,
        tiers: Sequence[LowerTier],
        write_policy: WritePolicy = "write_through",
        staging_limit_bytes: int = 1024**3,
    ) -> None:
        if write_policy not in ("write_through", "write_on_evict"):
            raise ValueError(f"unknown write_policy {write_policy!r}")
        self.tiers = list(tiers)
        self.write_policy = write_policy
        self.staging_limit_bytes = staging_limit_bytes
        self._engine: CacheEngine | None = None
        self._mutex = threading.Lock()
        self._promoted_from: dict[ChunkKey, int] = {}  # promotion committing now: its source
        self._origin: dict[ChunkKey, int] = {}  # write-on-evict: L1 entries that came from below
        self._staged_bytes = 0
        self._pinned_bytes = 0
        self._warn = RateLimitedLog(log)
        self.counters: dict[str, int] = {
            "promotions_refused": 0,
            "writes_queued": 0,
            "writes_dropped": 0,
            "staged_writes": 0,
        }

    def attach(self, engine: CacheEngine) -> None:
        self._engine = engine
        engine.lower_tiers = self
        engine.commit_listeners.append(self._on_commit)
        if self.write_policy == "write_on_evict":
            engine.evict_listeners.append(self._on_evict)

    # ----- lookups and promotion (called by the engine) -----
    def locate(self, keys: Sequence[ChunkKey]) -> list[tuple[int, int]]:
        """(tier index, bytes) of the leading ``keys`` found below L1, trying tiers in order."""
        found: list[tuple[int, int]] = []
        position = 0
        while position < len(keys):
            for index, tier in enumerate(self.tiers):
                sizes = tier.locate(keys[position:])
                if sizes:
                    found.extend((index, size) for size in sizes)
                    position += len(sizes)
                    break
            else:
                break
        return found

    def promote(self, engine: CacheEngine, items: Sequence[tuple[Reservation, int]]) -> None:
        """Fill reserved L1 pages from the tiers in the background, then commit (or abort)."""
        for reservation, index in items:
            task = functools.partial(self._promote_one, engine, reservation, index)
            if not self.tiers[index].pool.submit(Priority.PREFETCH, task):
                with self._mutex:
                    self.counters["promotions_refused"] += 1
                engine.abort(reservation)

    def _promote_one(self, engine: CacheEngine, reservation: Reservation, index: int) -> None:
        loaded = False
        try:
            loaded = self.tiers[index].load_into(
                reservation.key, reservation.span.segments(), reservation.span.nbytes
            )
        finally:
            if loaded:
                with self._mutex:
                    self._promoted_from[reservation.key] = index
                engine.commit(reservation)
            else:
                engine.abort(reservation)

    # ----- writes down -----
    def _on_commit(self, key: ChunkKey, span: PageSpan) -> None:
        with self._mutex:
            source = self._promoted_from.pop(key, None)
            if source is not None and self.write_policy == "write_on_evict":
                if len(self._origin) >= MAX_ORIGINS:
                    self._origin.clear()  # forgetting only costs a redundant write-down
                self._origin[key] = source
        if self.write_policy != "write_through":
            return
        for index, tier in enumerate(self.tiers):
            if source is not None and index >= source:
                break  # the source tier and those below it already hold the chunk
            if getattr(tier, "available", True) and not tier.has(key):
                self._write_pinned(index, key)

    def _write_pinned(self, index: int, key: ChunkKey) -> None:
        engine = self._engine
        if engine is None:
            return
        pinned = engine.pin([key])
        if not pinned:
            return  # already evicted: nothing to write
        span = pinned[0].span
        # Entries pinned for write-down cannot be evicted: keep them to a share of L1, and
        # write the rest from a staging copy.
        with self._mutex:
            room = self._pinned_bytes + span.nbytes <= engine.pool.capacity_bytes * PINNED_SHARE
            if room:
                self._pinned_bytes += span.nbytes
        if not room:
            try:
                self._write_staged(key, span, [index])
            finally:
                engine.unpin(pinned, retrieved=False)
            return
        task = functools.partial(self._store_pinned, engine, index, pinned)
        if self.tiers[index].pool.submit(Priority.PUT, task):
            with self._mutex:
                self.counters["writes_queued"] += 1
            return
        engine.unpin(pinned, retrieved=False)
        with self._mutex:
            self._pinned_bytes -= span.nbytes
            self.counters["writes_dropped"] += 1
        self._warn.warning(
            "queue-full",
            "%s tier: write queue full, chunk not written down (the tier is slower than stores)",
            self.tiers[index].name,
        )

    def _store_pinned(self, engine: CacheEngine, index: int, pinned: list[Pinned]) -> None:
        span = pinned[0].span
        try:
            self.tiers[index].store_from(pinned[0].key, span.segments(), span.nbytes)
        finally:
            engine.unpin(pinned, retrieved=False)
            with self._mutex:
                self._pinned_bytes -= span.nbytes

    def _on_evict(self, key: ChunkKey, span: PageSpan) -> None:
        """Write-on-evict: runs under the engine's lock, so copy the bytes out and go."""
        with self._mutex:
            origin = self._origin.pop(key, None)
        targets = [
            index
            for index, tier in enumerate(self.tiers)
            if (origin is None or index < origin) and not tier.has(key)
        ]
        if targets:
            self._write_staged(key, span, targets)

    def _write_staged(self, key: ChunkKey, span: PageSpan, targets: list[int]) -> None:
        """Copy the chunk to a staging buffer (bounded) and queue its writes from there."""
        with self._mutex:
            if self._staged_bytes + span.nbytes > self.staging_limit_bytes:
                self.counters["writes_dropped"] += len(targets)
                return
            self._staged_bytes += span.nbytes
            self.counters["staged_writes"] += 1
        staged = torch.empty(span.nbytes, dtype=torch.uint8)
        span.read_into([staged])
        remaining = [len(targets)]

        def done() -> None:
            with self._mutex:
                remaining[0] -= 1
                if remaining[0] == 0:
                    self._staged_bytes -= span.nbytes

        def store(index: int) -> None:
            try:
                self.tiers[index].store_from(key, [staged], span.nbytes)
            finally:
                done()

        for index in targets:
            if self.tiers[index].pool.submit(Priority.PUT, functools.partial(store, index)):
                with self._mutex:
                    self.counters["writes_queued"] += 1
                continue
            with self._mutex:
                self.counters["writes_dropped"] += 1
            done()

    # ----- admin -----
    def remove(self, key: ChunkKey) -> None:
        """Delete ``key`` from every tier (background, delete priority)."""
        for tier in self.tiers:
            remover = getattr(tier, "remove", None)
            if remover is not None:
                tier.pool.submit(Priority.DELETE, functools.partial(remover, key))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every tier's queue is empty; False on timeout."""
        return all(tier.pool.drain(timeout) for tier in self.tiers)

    def tier_stats(self) -> dict[str, dict[str, StatValue]]:
        stats: dict[str, dict[str, StatValue]] = {t.name: t.stats().as_dict() for t in self.tiers}
        with self._mutex:
            stats["tiering"] = {
                "write_policy": self.write_policy,
                "staged_bytes": self._staged_bytes,
                "write_pinned_bytes": self._pinned_bytes,
                **self.counters,
            }
        return stats

    def close(self) -> None:
        """Detach from the engine, finish queued writes (bounded), release the tiers."""
        engine = self._engine
        if engine is not None:
            engine.lower_tiers = None
            if self._on_commit in engine.commit_listeners:
                engine.commit_listeners.remove(self._on_commit)
            if self._on_evict in engine.evict_listeners:
                engine.evict_listeners.remove(self._on_evict)
        for tier in self.tiers:
            try:
                tier.close()
            except Exception:  # closing must go on to the next tier
                log.exception("closing the %s tier failed", tier.name)
