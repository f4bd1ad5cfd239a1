"""The client's exceptions: one root, names that shadow no builtins."""

from __future__ import annotations


class NodeClientError(Exception):
    """Root of every error the node client raises."""


class NodeUnavailableError(NodeClientError):
    """No connection to the server right now (down, restarting, or never reached)."""


class NodeAuthenticationError(NodeUnavailableError):
    """The server refused this client's CURVE credentials (or the client has none)."""


class NodeTimeoutError(NodeClientError):
    """The server did not answer within the call's timeout."""


class RemoteError(NodeClientError):
    """The server answered with a typed error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class IncompatibleServerError(RemoteError):
    """Protocol version, chunk size or transfer mode do not match the server's."""
