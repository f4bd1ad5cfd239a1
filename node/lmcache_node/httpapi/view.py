"""What the HTTP API reads of the node server: a narrow, structural interface.

The HTTP API never imports the server (an import contract in pyproject.toml says so); the
serve command hands it the ``NodeServer``, which has these members.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry

from lmcache_node.config import NodeConfig

if TYPE_CHECKING:
    from lmcache_node.engine.core import EngineStats
    from lmcache_node.engine.types import PoolState


class CacheView(Protocol):
    def clear(self) -> int:
        """Drop every chunk; the number dropped."""
        ...

    def stats(self) -> EngineStats: ...
    @property
    def pool_state(self) -> PoolState: ...


class MetricsView(Protocol):
    @property
    def registry(self) -> CollectorRegistry: ...


class NodeView(Protocol):
    """The server as /healthz, /readyz, /metrics, /stats, /config and the admin calls see it."""

    @property
    def config(self) -> NodeConfig: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def ready(self) -> bool: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def metrics(self) -> MetricsView: ...
    @property
    def engine(self) -> CacheView: ...
    def stats(self) -> dict[str, Any]: ...
