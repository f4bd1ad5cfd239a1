"""Thread-safe client of the node server (used by the vLLM connector and the bench)."""

from lmcache_node.client.errors import (
    IncompatibleServerError,
    NodeClientError,
    NodeTimeoutError,
    NodeUnavailableError,
    RemoteError,
)
from lmcache_node.client.node_client import HandshakeInfo, NodeClient
from lmcache_node.client.registrations import Registration
from lmcache_node.transfer.export import layout_tag

__all__ = [
    "HandshakeInfo",
    "IncompatibleServerError",
    "NodeClient",
    "NodeClientError",
    "NodeTimeoutError",
    "NodeUnavailableError",
    "Registration",
    "RemoteError",
    "layout_tag",
]
