"""The in-process tiered cache engine: L1 memory pool, eviction policy, locks and pins."""

from lmcache_node.engine.core import CacheEngine, EngineStats, LookupResult, Pinned, Reservation
from lmcache_node.engine.memory import MemoryPool, PageSpan, copy_stream
from lmcache_node.engine.policy import EvictionPolicy, LRUPolicy, make_policy
from lmcache_node.engine.types import PoolState, StoreOutcome

__all__ = [
    "CacheEngine",
    "EngineStats",
    "EvictionPolicy",
    "LRUPolicy",
    "LookupResult",
    "MemoryPool",
    "PageSpan",
    "Pinned",
    "PoolState",
    "Reservation",
    "StoreOutcome",
    "copy_stream",
    "make_policy",
]
