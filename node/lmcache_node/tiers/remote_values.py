"""Names and seals of remote values: keyed per cluster, every value MAC-checked on read.

With the cluster's secret (``remote_secret_file``), chunk key ``k`` lives under

    <remote_key_prefix>:v2:<hex HMAC-SHA256(secret, "lmcache/remote-name" 0x00 k)>

and its value is a chunk frame followed by a 32-byte tag,
``HMAC-SHA256(secret, "lmcache/remote-value" 0x00 len(name) name frame)``. The frame's key field
holds the first 16 bytes of the name's HMAC, not ``k``: the database never shows chunk keys.
Another cluster sharing the database (another secret) can neither compute our names nor
forge a tag, so what it writes under our names is rejected on read.

Without a secret (``insecure_allow_unauthenticated``) names are ``<prefix>:v2:<hex k>`` and the
tag is a plain SHA-256 of the same message: damage is caught, forgery is not.
Values of the previous format (``:v1:`` names) are never read: they are misses.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lmcache_node.keys import KEY_BYTES, ChunkKey
from lmcache_node.tiers.frame import (
    HEADER_BYTES,
    DecompressionLimitError,
    FrameError,
    FrameHeader,
    WrongKeyError,
    check_header,
    decode_header,
    parse_frame,
)

VALUE_FORMAT = 2
MAC_BYTES = 32
MIN_SECRET_BYTES = 16
_NAME_DOMAIN = b"lmcache/remote-name\0"
_VALUE_DOMAIN = b"lmcache/remote-value\0"


class RejectReason(enum.Enum):
    """Why a value read from the remote store was refused (the metric's ``reason`` label)."""

    BAD_MAC = "bad_mac"  # the tag does not match: damaged, or written without our secret
    TRUNCATED = "truncated"  # shorter than its header says
    WRONG_KEY = "wrong_key"  # an intact frame of another chunk
    DECOMPRESSION = "decompression"  # would expand beyond the chunk's size
    MALFORMED = "malformed"  # anything else: format, layout, size, checksum


class RejectedValue(FrameError):  # noqa: N818 - reads as what the value is
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


class RemoteSecretError(ValueError):
    """The remote secret file is missing, unreadable or too short."""


def read_remote_secret(path: str | os.PathLike[str]) -> bytes:
    """The secret bytes of ``path`` (a trailing newline is ignored), at least 16 of them."""
    file = Path(path)
    try:
        secret = file.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise RemoteSecretError(
            f"cannot read the remote tier's secret (remote_secret_file) from {str(file)!r}: "
            f"{exc.strerror or exc}; mount the cluster's credentials Secret there"
        ) from None
    check_secret(secret, f"the remote secret file {str(file)!r}")
    return secret


def check_secret(secret: bytes, where: str) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise RemoteSecretError(
            f"{where} holds {len(secret)} bytes; a remote secret needs at least "
            f"{MIN_SECRET_BYTES} (e.g. `head -c 32 /dev/urandom | base64`)"
        )


class _Digest(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...


@dataclass(frozen=True)
class ValueSeal:
    """Derives remote names and seals/opens values for one cluster (prefix + secret)."""

    prefix: str
    secret: bytes | None
    _name_prefix: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.secret is not None:
            check_secret(self.secret, "the remote secret")
        object.__setattr__(self, "_name_prefix", f"{self.prefix}:v{VALUE_FORMAT}:")

    @property
    def keyed(self) -> bool:
        return self.secret is not None

    @property
    def name_prefix(self) -> str:
        return self._name_prefix

    def _hasher(self) -> _Digest:
        if self.secret is None:
            return hashlib.sha256()
        return hmac.new(self.secret, digestmod=hashlib.sha256)

    def _name_digest(self, key: ChunkKey) -> bytes:
        hasher = self._hasher()
        hasher.update(_NAME_DOMAIN)
        hasher.update(bytes(key))
        return hasher.digest()

    def name(self, key: ChunkKey) -> str:
        """The database key of chunk ``key``."""
        if self.secret is None:
            return self._name_prefix + key.hex()
        return self._name_prefix + self._name_digest(key).hex()

    def frame_key(self, key: ChunkKey) -> ChunkKey:
        """What the frame header of chunk ``key`` holds in its key field."""
        if self.secret is None:
            return key
        return ChunkKey(self._name_digest(key)[:KEY_BYTES])

    def tag(self, name: str, frame: bytes | memoryview) -> bytes:
        encoded = name.encode()
        hasher = self._hasher()
        hasher.update(_VALUE_DOMAIN)
        hasher.update(len(encoded).to_bytes(4, "big"))
        hasher.update(encoded)
        hasher.update(frame)
        return hasher.digest()

    def seal(self, name: str, value: memoryview) -> None:
        """Fill the last ``MAC_BYTES`` of ``value`` (a frame plus room) with its tag."""
        value[-MAC_BYTES:] = self.tag(name, value[:-MAC_BYTES])

    def check_head(self, head: bytes | memoryview, key: ChunkKey, layout: str) -> FrameHeader:
        """The header at the start of a value (lookups read only that); RejectedValue."""
        if len(head) < HEADER_BYTES:
            raise RejectedValue(RejectReason.TRUNCATED, f"{len(head)} bytes, no whole header")
        try:
            header = decode_header(head)
            check_header(header, self.frame_key(key), layout)
        except WrongKeyError as exc:
            raise RejectedValue(RejectReason.WRONG_KEY, str(exc)) from None
        except FrameError as exc:
            raise RejectedValue(RejectReason.MALFORMED, str(exc)) from None
        return header

    def open(
        self, name: str, value: bytes, key: ChunkKey, layout: str, nbytes: int
    ) -> bytes | memoryview:
        """The chunk's ``nbytes`` raw bytes from ``value``; RejectedValue with the reason."""
        view = memoryview(value)
        if len(view) < HEADER_BYTES + MAC_BYTES:
            raise RejectedValue(RejectReason.TRUNCATED, f"{len(view)} bytes")
        frame = view[:-MAC_BYTES]
        if not hmac.compare_digest(self.tag(name, frame), view[-MAC_BYTES:]):
            raise RejectedValue(_unsealed_reason(frame), "the MAC does not match")
        try:
            return parse_frame(frame, self.frame_key(key), layout, raw_len=nbytes)
        except WrongKeyError as exc:
            raise RejectedValue(RejectReason.WRONG_KEY, str(exc)) from None
        except DecompressionLimitError as exc:
            raise RejectedValue(RejectReason.DECOMPRESSION, str(exc)) from None
        except FrameError as exc:
            raise RejectedValue(RejectReason.MALFORMED, str(exc)) from None


def _unsealed_reason(frame: memoryview) -> RejectReason:
    """A value whose tag fails: cut short (its header asks for more), or else a bad MAC."""
    try:
        header = decode_header(frame)
    except FrameError:
        return RejectReason.BAD_MAC
    return RejectReason.TRUNCATED if header.frame_len > len(frame) else RejectReason.BAD_MAC
