"""Who may call the HTTP API's admin endpoints: a bearer token from a file, else loopback.

The token file (``http_token_file``, a Kubernetes Secret volume) is read at start (an
unreadable or empty file refuses the start) and re-read when it changes, so a rotated token
needs no restart; a file that later becomes unreadable or empty keeps the last good token.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class TokenFileError(ValueError):
    """The token file is missing, unreadable or empty; the message names it and the fix."""


def is_loopback(peer: str | None) -> bool:
    """Is ``peer`` (an IP address as the socket reports it) a loopback address?"""
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@dataclass
class TokenFile:
    """The admin bearer token, re-read from ``path`` when the file changes."""

    path: Path
    recheck_s: float = 1.0
    _token: bytes = field(default=b"", init=False, repr=False)
    _stamp: tuple[int, int, int] | None = field(default=None, init=False)
    _checked: float = field(default=float("-inf"), init=False)
    _last_error: str = field(default="", init=False)
    _mutex: threading.Lock = field(default_factory=threading.Lock, init=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], recheck_s: float = 1.0) -> TokenFile:
        token = cls(Path(path), recheck_s)
        token._load(strict=True)
        return token

    def matches(self, presented: str | None) -> bool:
        """Constant-time comparison of ``presented`` with the current token."""
        if presented is None:
            return False
        with self._mutex:
            if time.monotonic() - self._checked >= self.recheck_s:
                self._load(strict=False)
            token = self._token
        return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), token)

    def _load(self, *, strict: bool) -> None:
        self._checked = time.monotonic()
        try:
            info = self.path.stat()
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
            if stamp == self._stamp:
                return
            token = self.path.read_bytes().strip()
            if not token:
                raise TokenFileError("the file is empty")
        except (OSError, TokenFileError) as exc:
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if strict:
                raise TokenFileError(
                    f"cannot use the HTTP API token file (http_token_file) "
                    f"{str(self.path)!r}: {message}; mount the cluster's credentials Secret "
                    "there, or unset http_token_file (admin endpoints then answer loopback "
                    "clients only)"
                ) from None
            if message != self._last_error:  # once per new problem, not every re-check
                log.error("kept the previous HTTP API token: %s: %s", self.path, message)
            self._last_error = message
            return
        self._last_error = ""
        if self._stamp is not None and token != self._token:
            log.info("HTTP API token changed (re-read %s)", self.path)
        self._token = token
        self._stamp = stamp
