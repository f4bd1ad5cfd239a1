"""Small shared types of the engine."""

from __future__ import annotations

import enum


class StoreOutcome(enum.Enum):
    """What a store reservation got; "no space" is a result, never an exception."""

    RESERVED = "reserved"
    DUPLICATE = "duplicate"  # already stored or being stored by someone else: skip
    NO_SPACE = "no_space"  # nothing evictable frees enough pages
    TOO_LARGE = "too_large"  # larger than the whole pool
    DISABLED = "disabled"  # the L1 tier is off (local_cpu: false or size 0)


class EntryState(enum.Enum):
    WRITING = "writing"  # reserved, invisible to lookups
    READY = "ready"  # committed, visible
    PROMOTING = "promoting"  # being filled from a lower tier: lookups count it, pin waits for it
