"""What the HTTP API reads of the node server: a narrow, structural interface.

The HTTP API never imports the server (an import contract in pyproject.toml says so); the
serve command hands it the ``NodeServer``, which has these members.
"""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from lmcache_node.config import NodeConfig


class ClearableCache(Protocol):
    def clear(self) -> int:
        """Drop every chunk; the number dropped."""
        ...


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
    def engine(self) -> ClearableCache: ...
    def stats(self) -> dict[str, Any]: ...
