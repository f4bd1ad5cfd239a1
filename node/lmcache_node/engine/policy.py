"""Eviction policies, separate from allocation: they only order candidates."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

from lmcache_node.keys import ChunkKey


class EvictionPolicy(Protocol):
    """Tracks committed keys and yields them in eviction order."""

    def inserted(self, key: ChunkKey) -> None: ...
    def accessed(self, key: ChunkKey) -> None: ...
    def removed(self, key: ChunkKey) -> None: ...
    def candidates(self) -> Iterator[ChunkKey]: ...


class LRUPolicy:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[ChunkKey, None] = OrderedDict()

    def inserted(self, key: ChunkKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def accessed(self, key: ChunkKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def removed(self, key: ChunkKey) -> None:
        self._order.pop(key, None)

    def candidates(self) -> Iterator[ChunkKey]:
        # Callers collect victims before removing any: the order must not change mid-walk.
        return iter(self._order)


def make_policy(name: str) -> EvictionPolicy:
    if name.upper() == "LRU":
        return LRUPolicy()
    raise ValueError(f"unknown cache_policy {name!r}: supported: LRU")
