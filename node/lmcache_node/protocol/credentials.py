"""CURVE credentials of the node's ZMQ transport, read from files (pyzmq does the crypto).

Keys are Z85 text of 40 characters, as ``zmq.curve_keypair()`` returns them; a trailing
newline is ignored. The server holds its secret key and a file of allowed client public
keys (one per line, optionally followed by a space and a label), re-read when it changes
so a rotation needs no restart. A client holds a directory with ``client.key`` (its
secret key), optionally ``client.pub`` (checked against the secret) and ``server.pub``
(the server it trusts).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils import z85

log = logging.getLogger(__name__)

KEY_CHARS = 40
CLIENT_SECRET_FILE = "client.key"  # noqa: S105 - a file name
CLIENT_PUBLIC_FILE = "client.pub"
SERVER_PUBLIC_FILE = "server.pub"


class CredentialsError(ValueError):
    """A key file that is missing or malformed; the message names the file and the fix."""


def parse_key(text: str | bytes, where: str) -> bytes:
    """A Z85 key (40 characters) from ``text``; ``where`` names its origin in errors."""
    raw = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    key = raw.strip()
    if len(key) != KEY_CHARS:
        raise CredentialsError(
            f"{where} does not hold a CURVE key: expected 40 Z85 characters, found "
            f"{len(key)}; generate keys with `lmcache-node keys generate`"
        )
    try:
        z85.decode(key.encode("ascii"))
    except (ValueError, UnicodeEncodeError, KeyError):
        raise CredentialsError(
            f"{where} is not a Z85-encoded CURVE key; generate keys with "
            "`lmcache-node keys generate`"
        ) from None
    return key.encode("ascii")


def read_key(path: str | os.PathLike[str], what: str) -> bytes:
    file = Path(path)
    try:
        text = file.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise CredentialsError(
            f"cannot read the {what} from {str(file)!r}: {exc.strerror or exc}"
        ) from None
    return parse_key(text, f"the {what} file {str(file)!r}")


def public_key_of(secret_key: bytes) -> bytes:
    return bytes(zmq.curve_public(secret_key))


def generate_keypair() -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from libzmq's CURVE implementation."""
    public, secret = zmq.curve_keypair()
    return bytes(public), bytes(secret)


def fingerprint(public_key: bytes) -> str:
    """A short, non-secret name for a public key in logs and status."""
    return public_key[:8].decode("ascii")


@dataclass(frozen=True)
class ServerCredentials:
    secret_key: bytes
    public_key: bytes

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ServerCredentials:
        secret = read_key(path, "server secret key (curve_server_key)")
        return cls(secret_key=secret, public_key=public_key_of(secret))

    def apply(self, socket: zmq.Socket[bytes]) -> None:
        """Make ``socket`` a CURVE server (before bind)."""
        socket.curve_secretkey = self.secret_key
        socket.curve_publickey = self.public_key
        socket.curve_server = True


@dataclass(frozen=True)
class ClientCredentials:
    secret_key: bytes
    public_key: bytes
    server_public_key: bytes

    @classmethod
    def from_directory(cls, path: str | os.PathLike[str]) -> ClientCredentials:
        directory = Path(path)
        if not directory.is_dir():
            raise CredentialsError(
                f"the client credentials directory {str(directory)!r} does not exist: mount the "
                f"cluster's client-credentials Secret there (it holds {CLIENT_SECRET_FILE} and "
                f"{SERVER_PUBLIC_FILE})"
            )
        secret = read_key(directory / CLIENT_SECRET_FILE, "client secret key")
        public = public_key_of(secret)
        public_file = directory / CLIENT_PUBLIC_FILE
        if public_file.exists() and read_key(public_file, "client public key") != public:
            raise CredentialsError(
                f"{str(public_file)!r} does not match {CLIENT_SECRET_FILE} in the same "
                "directory: the Secret holds keys of two different pairs; rotate the keys again"
            )
        server = read_key(directory / SERVER_PUBLIC_FILE, "server public key")
        return cls(secret_key=secret, public_key=public, server_public_key=server)

    def apply(self, socket: zmq.Socket[bytes]) -> None:
        """Make ``socket`` a CURVE client of the server (before connect)."""
        socket.curve_secretkey = self.secret_key
        socket.curve_publickey = self.public_key
        socket.curve_serverkey = self.server_public_key


@dataclass
class AllowedClientKeys:
    """The allowed client public keys, re-read from their file when it changes.

    Used as a pyzmq ZAP credentials provider (``callback``); a file that becomes unreadable
    or malformed keeps the last good set and logs why, so a bad edit never locks clients out
    silently nor lets anyone in.
    """

    path: Path
    recheck_s: float = 1.0
    _keys: frozenset[bytes] = field(default=frozenset(), init=False)
    _stamp: tuple[int, int, int] | None = field(default=None, init=False)
    _checked: float = field(default=float("-inf"), init=False)
    _mutex: threading.Lock = field(default_factory=threading.Lock, init=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], recheck_s: float = 1.0) -> AllowedClientKeys:
        allowed = cls(Path(path), recheck_s)
        allowed._load(strict=True)
        return allowed

    def keys(self) -> frozenset[bytes]:
        with self._mutex:
            if time.monotonic() - self._checked >= self.recheck_s:
                self._load(strict=False)
            return self._keys

    def allows(self, public_key: bytes) -> bool:
        return public_key in self.keys()

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: ``key`` is the client's Z85 public key."""
        allowed = self.allows(bytes(key))
        if not allowed:
            log.warning(
                "refused a CURVE client with key %s: not in %s", fingerprint(bytes(key)), self.path
            )
        return allowed

    def _load(self, *, strict: bool) -> None:
        self._checked = time.monotonic()
        try:
            info = self.path.stat()
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
            if stamp == self._stamp:
                return
            text = self.path.read_text(encoding="ascii", errors="replace")
            keys = _parse_key_list(text, self.path)
        except (OSError, CredentialsError) as exc:
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if strict:
                raise CredentialsError(
                    f"cannot read the allowed client keys (curve_client_keys) from "
                    f"{str(self.path)!r}: {message}"
                ) from None
            log.error("kept the previous allowed client keys: %s", message)
            return
        if keys != self._keys and self._stamp is not None:
            log.info(
                "allowed client keys changed: %d key(s) (%s)",
                len(keys),
                ", ".join(sorted(fingerprint(k) for k in keys)),
            )
        self._keys = keys
        self._stamp = stamp


def _parse_key_list(text: str, path: Path) -> frozenset[bytes]:
    keys: set[bytes] = set()
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()  # Z85 has no whitespace: anything after the key is a label
        if fields:
            keys.add(parse_key(fields[0], f"line {number} of {str(path)!r}"))
    if not keys:
        raise CredentialsError(f"{str(path)!r} lists no client key: add one Z85 key per line")
    return frozenset(keys)
