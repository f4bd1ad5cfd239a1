"""Encoding and decoding of frames; every failure is a ``FrameError`` with an error code."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from lmcache_node.protocol.messages import (
    MAGIC,
    PROTOCOL_VERSION,
    REPLY_TYPES,
    REQUEST_TYPES,
    ErrorCode,
    ErrorReply,
    Header,
    Op,
    Status,
)

T = TypeVar("T", bound=msgspec.Struct)

_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(Header)
_MESSAGE_TYPES: list[type[msgspec.Struct]] = [
    *REQUEST_TYPES.values(),
    *REPLY_TYPES.values(),
    ErrorReply,
]
_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {
    cls: msgspec.msgpack.Decoder(cls) for cls in _MESSAGE_TYPES
}


class FrameError(Exception):
    """A frame that cannot be served; ``code`` says which kind of wrong it is."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode_request(op: Op, request_id: int, payload: msgspec.Struct) -> list[bytes]:
    header = Header(MAGIC, PROTOCOL_VERSION, int(op), request_id)
    return [_encoder.encode(header), _encoder.encode(payload)]


def encode_reply(header: Header, payload: msgspec.Struct) -> list[bytes]:
    status = Status.ERROR if isinstance(payload, ErrorReply) else Status.OK
    reply = Header(MAGIC, PROTOCOL_VERSION, header.op, header.request_id, int(status))
    return [_encoder.encode(reply), _encoder.encode(payload)]


def decode_header(frame: bytes) -> Header:
    """Decode and check a header (magic and version)."""
    try:
        header = _header_decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise FrameError(
            ErrorCode.BAD_FRAME, f"the header frame is not a protocol header: {exc}"
        ) from None
    if header.magic != MAGIC:
        raise FrameError(
            ErrorCode.BAD_FRAME,
            f"bad magic {header.magic!r} (expected {MAGIC!r}): is this an lmcache-node client?",
        )
    if header.version != PROTOCOL_VERSION:
        raise FrameError(
            ErrorCode.BAD_VERSION,
            f"protocol version {header.version} is not supported (server speaks "
            f"{PROTOCOL_VERSION}): upgrade the client or the server so they match",
        )
    return header


def op_of(header: Header) -> Op:
    try:
        return Op(header.op)
    except ValueError:
        raise FrameError(
            ErrorCode.UNKNOWN_OP,
            f"unknown op {header.op}; known ops: {', '.join(op.name for op in Op)}",
        ) from None


def decode_payload(frame: bytes, cls: type[T]) -> T:
    try:
        result: T = _decoders[cls].decode(frame)
    except msgspec.ValidationError as exc:
        raise FrameError(ErrorCode.BAD_REQUEST, f"invalid {cls.__name__}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise FrameError(
            ErrorCode.BAD_FRAME, f"payload of {cls.__name__} is not msgpack: {exc}"
        ) from None
    return result
