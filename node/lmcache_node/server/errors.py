"""The typed failure of a request: answered as an ``ErrorReply`` with its code."""

from __future__ import annotations

from lmcache_node.protocol import messages as m


class RequestError(Exception):
    def __init__(self, code: m.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
