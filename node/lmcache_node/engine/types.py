"""Small shared types of the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

PoolOrigin = Literal["adopted", "created", "anonymous", "disabled"]


class StoreOutcome(enum.Enum):
    """What a store reservation got; "no space" is a result, never an exception."""

    RESERVED = "reserved"
    DUPLICATE = "duplicate"  # already stored or being stored by someone else: skip
    NO_SPACE = "no_space"  # nothing evictable frees enough pages
    TOO_LARGE = "too_large"  # larger than the whole pool
    DISABLED = "disabled"  # the L1 pool has no pages (max_local_cpu_size: 0)


class EntryState(enum.Enum):
    WRITING = "writing"  # reserved, invisible to lookups
    READY = "ready"  # committed, visible
    PROMOTING = "promoting"  # being filled from a lower tier: lookups count it, pin waits for it


@dataclass(frozen=True)
class PoolState:
    """Where the L1 pool's memory came from, for /readyz, /stats and /metrics.

    adopted: a named shm segment a previous server left, with its chunks; created: a new
    named segment (``reason`` says why nothing was adopted); anonymous: process memory, lost
    at exit (``reason`` says why); disabled: no L1 tier.
    """

    origin: PoolOrigin
    reason: str = ""

    @property
    def persistent(self) -> bool:
        return self.origin in ("adopted", "created")


class LockLimitError(Exception):
    """An owner asked for more lookup locks than it may hold at once."""

    def __init__(self, owner_locks: int, limit: int) -> None:
        super().__init__(
            f"this session holds {owner_locks} lookup lock(s), the most allowed is {limit} "
            "(max_locks_per_session): free locks after each retrieve"
        )


class ForeignLockError(Exception):
    """Lock ids that belong to another owner; nothing was released."""

    def __init__(self, lock_ids: list[int]) -> None:
        self.lock_ids = lock_ids
        shown = ", ".join(str(i) for i in lock_ids[:8])
        super().__init__(
            f"lock id(s) {shown} belong to another session: a session frees only its own locks"
        )
