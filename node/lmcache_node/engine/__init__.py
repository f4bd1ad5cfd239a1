"""The in-process tiered cache engine: L1 memory pool, eviction policy, locks and pins."""

from lmcache_node.engine.core import CacheEngine, EngineStats, LookupResult, Pinned, Reservation
from lmcache_node.engine.factory import build_engine
from lmcache_node.engine.memory import MemoryPool, PageSpan, copy_stream
from lmcache_node.engine.policy import EvictionPolicy, LRUPolicy, make_policy
from lmcache_node.engine.types import StoreOutcome

__all__ = [
    "CacheEngine",
    "EngineStats",
    "EvictionPolicy",
    "LRUPolicy",
    "LookupResult",
    "MemoryPool",
    "PageSpan",
    "Pinned",
    "Reservation",
    "StoreOutcome",
    "build_engine",
    "copy_stream",
    "make_policy",
]
