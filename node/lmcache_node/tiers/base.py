"""The contract every tier below L1 keeps, its stats, and small shared helpers.

A lower tier moves one chunk at a time between flat uint8 tensors (L1 page segments) and its
medium. Every method returns a result; failures of the medium are misses, counted and logged,
never exceptions to the caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from lmcache_node.keys import ChunkKey
from lmcache_node.tiers.workers import TaskPool

StatValue = float | int | bool | str


@dataclass
class TierStats:
    """Counters of one tier; ``available`` is False while the medium cannot be used."""

    name: str
    available: bool = True
    state: str = "ok"
    entries: int = 0
    used_bytes: int = 0
    capacity_bytes: int = 0
    lookups: int = 0
    lookup_hits: int = 0
    hits: int = 0
    hit_bytes: int = 0
    misses: int = 0
    stores: int = 0
    stored_bytes: int = 0
    dropped_stores: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    errors: int = 0
    corrupt: int = 0
    pending_tasks: int = 0

    def as_dict(self) -> dict[str, StatValue]:
        return asdict(self)


class LowerTier(Protocol):
    """A tier below L1 (local disk, remote store)."""

    name: str
    pool: TaskPool

    def locate(self, keys: Sequence[ChunkKey]) -> list[int]:
        """Byte sizes of the leading ``keys`` this tier holds (stops at the first miss)."""
        ...

    def has(self, key: ChunkKey) -> bool:
        """Cheap membership check; a tier that cannot tell cheaply answers False."""
        ...

    def load_into(self, key: ChunkKey, dsts: Sequence[torch.Tensor], nbytes: int) -> bool:
        """Fill ``dsts`` (flat uint8, ``nbytes`` in all) with the verified chunk; False: miss."""
        ...

    def store_from(self, key: ChunkKey, srcs: Sequence[torch.Tensor], nbytes: int) -> bool:
        """Write the chunk held in ``srcs``; False when it was not stored."""
        ...

    def stats(self) -> TierStats: ...

    def close(self) -> None: ...


class RateLimitedLog:
    """Log a recurring warning at most once per ``interval`` seconds (with a repeat count)."""

    def __init__(self, logger: logging.Logger, interval: float = 30.0) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._mutex = threading.Lock()

    def warning(self, topic: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._mutex:
            last = self._last.get(topic)
            if last is not None and now - last < self._interval:
                self._suppressed[topic] = self._suppressed.get(topic, 0) + 1
                return
            self._last[topic] = now
            repeats = self._suppressed.pop(topic, 0)
        if repeats:
            self._log.warning(message + " (and %d more since the last report)", *args, repeats)
        else:
            self._log.warning(message, *args)


def numpy_views(tensors: Sequence[torch.Tensor]) -> list[memoryview]:
    """Writable memoryviews over flat uint8 CPU tensors (no copy)."""
    return [memoryview(t.numpy()) for t in tensors]  # type: ignore[arg-type]
