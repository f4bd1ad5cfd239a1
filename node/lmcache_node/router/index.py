"""What each node server holds, as the router knows it from snapshots and events.

One ``NodeIndex`` per node server: a dict from key digest (``protocol.events.digest_int``)
to a tier mask (bit 0: L1, bit 1: L2). A prefix query walks a request's digests and stops
at the first one the node lacks. Bounded: past ``max_keys`` the oldest-inserted entries are
dropped in slices (at worst a request is routed as if that chunk were missing); about
100 bytes per key, roughly 10 million keys per GB (measured by ``make bench-router``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lmcache_node.protocol.events import NamespaceInfo, split_digests

log = logging.getLogger(__name__)

TIER_BITS = {"l1": 1, "l2": 2}
EVICT_SLICE = 0.05  # share of the entries dropped at once when the bound is reached


@dataclass(frozen=True)
class PrefixHold:
    """Leading chunks of a request a node holds: ``l1`` of them in memory, then ``l2``
    more on disk only (a chunk in both counts as L1)."""

    l1: int = 0
    l2: int = 0

    @property
    def chunks(self) -> int:
        return self.l1 + self.l2


@dataclass
class NodeIndex:
    """The keys one node server holds, per tier."""

    name: str
    max_keys: int = 1 << 21
    entries: dict[int, int] = field(default_factory=dict)
    namespaces: list[NamespaceInfo] = field(default_factory=list)
    synced: bool = False  # a snapshot was applied and events follow without a gap
    dropped: int = 0  # entries dropped by the bound

    # ----- updates -----
    def replace(self, tiers: Mapping[str, bytes]) -> None:
        """Start over from a snapshot: ``tiers`` maps a tier to its concatenated digests."""
        self.entries = {}
        for tier, digests in tiers.items():
            self.stored(tier, split_digests(digests))

    def stored(self, tier: str, digests: Iterable[int]) -> None:
        bit = TIER_BITS.get(tier)
        if bit is None:
            return
        entries = self.entries
        for value in digests:
            entries[value] = entries.get(value, 0) | bit
        if len(entries) > self.max_keys:
            self._shrink()

    def evicted(self, tier: str, digests: Iterable[int]) -> None:
        bit = TIER_BITS.get(tier)
        if bit is None:
            return
        entries = self.entries
        for value in digests:
            mask = entries.get(value)
            if mask is None:
                continue
            mask &= ~bit
            if mask:
                entries[value] = mask
            else:
                del entries[value]

    def cleared(self, tier: str) -> None:
        bit = TIER_BITS.get(tier)
        if bit is None:
            return
        keep = {value: mask & ~bit for value, mask in self.entries.items() if mask & ~bit}
        self.entries = keep

    def _shrink(self) -> None:
        excess = len(self.entries) - self.max_keys
        count = max(excess, int(self.max_keys * EVICT_SLICE))
        oldest = list(itertools.islice(self.entries, count))
        for value in oldest:
            del self.entries[value]
        self.dropped += len(oldest)
        log.debug("index of %s at its bound: dropped %d oldest keys", self.name, len(oldest))

    # ----- queries -----
    def hold(self, digests: Sequence[int]) -> PrefixHold:
        """How many leading ``digests`` the node holds, and in which tier."""
        entries = self.entries
        l1 = l2 = 0
        for value in digests:  # as the engine looks up: L1 first, then the tiers below
            mask = entries.get(value, 0)
            if mask & 1 and not l2:
                l1 += 1
            elif mask & 2:
                l2 += 1
            else:
                break
        return PrefixHold(l1, l2)

    def count(self, tier: str) -> int:
        bit = TIER_BITS[tier]
        return sum(1 for mask in self.entries.values() if mask & bit)

    def seeds_for(self, model_name: str | None) -> list[bytes]:
        """Seeds of the rank-0 namespaces of ``model_name`` (any model when None)."""
        return [
            ns.seed
            for ns in self.namespaces
            if ns.worker_id == 0 and (model_name is None or ns.model_name == model_name)
        ]
