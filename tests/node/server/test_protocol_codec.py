"""Protocol structs and codec, in process."""

from __future__ import annotations

import msgspec
import pytest
from lmcache_node.protocol import messages as m
from lmcache_node.protocol.codec import (
    FrameError,
    decode_header,
    decode_payload,
    encode_reply,
    encode_request,
    op_of,
)


def test_every_op_has_request_and_reply_types() -> None:
    assert set(m.REQUEST_TYPES) == set(m.Op) == set(m.REPLY_TYPES)


def test_request_and_reply_round_trip() -> None:
    request = m.StoreRequest(registration_id=3, keys=[b"a" * 16, b"b" * 16], block_ids=[1, 2])
    frames = encode_request(m.Op.STORE, 42, request)
    header = decode_header(frames[0])
    assert (header.op, header.request_id, header.status) == (m.Op.STORE, 42, m.Status.OK)
    assert decode_payload(frames[1], m.StoreRequest) == request
    reply = encode_reply(header, m.ErrorReply(code="out_of_range", message="block 99"))
    reply_header = decode_header(reply[0])
    assert reply_header.status == m.Status.ERROR and reply_header.request_id == 42
    assert decode_payload(reply[1], m.ErrorReply).message == "block 99"


def test_header_is_a_compact_array() -> None:
    raw = msgspec.msgpack.decode(encode_request(m.Op.PING, 1, m.PingRequest())[0])
    assert raw == [m.MAGIC, m.PROTOCOL_VERSION, int(m.Op.PING), 1, 0]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"", m.ErrorCode.BAD_FRAME),
        (msgspec.msgpack.encode([b"LMCX", 1, 1, 1, 0]), m.ErrorCode.BAD_FRAME),
        (msgspec.msgpack.encode([m.MAGIC, 1, 1, 1, 0]), m.ErrorCode.BAD_VERSION),  # v1 peers
        (
            msgspec.msgpack.encode([m.MAGIC, m.PROTOCOL_VERSION + 1, 1, 1, 0]),
            m.ErrorCode.BAD_VERSION,
        ),
        (msgspec.msgpack.encode({"magic": m.MAGIC}), m.ErrorCode.BAD_FRAME),
    ],
)
def test_bad_headers(frame: bytes, code: m.ErrorCode) -> None:
    with pytest.raises(FrameError) as info:
        decode_header(frame)
    assert info.value.code is code


def test_unknown_op_and_wrong_payload_types() -> None:
    with pytest.raises(FrameError) as info:
        op_of(m.Header(m.MAGIC, m.PROTOCOL_VERSION, 77, 1))
    assert info.value.code is m.ErrorCode.UNKNOWN_OP
    with pytest.raises(FrameError) as info:
        decode_payload(msgspec.msgpack.encode({"keys": [1, 2]}), m.LookupRequest)
    assert info.value.code is m.ErrorCode.BAD_REQUEST
    with pytest.raises(FrameError) as info:
        decode_payload(msgspec.msgpack.encode({"keys": [], "extra": 1}), m.LookupRequest)
    assert info.value.code is m.ErrorCode.BAD_REQUEST


def test_a_success_reply_says_ok() -> None:
    header = decode_header(encode_request(m.Op.PING, 7, m.PingRequest())[0])
    reply_header = decode_header(encode_reply(header, m.PingReply(server_time=1.0))[0])
    assert reply_header.status == m.Status.OK
    assert (reply_header.op, reply_header.request_id) == (m.Op.PING, 7)


def test_op_of_a_known_op() -> None:
    assert op_of(m.Header(m.MAGIC, m.PROTOCOL_VERSION, int(m.Op.STORE), 1)) is m.Op.STORE


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"\xc1", "the header frame is not a protocol header: "),
        (
            msgspec.msgpack.encode([b"LMCX", m.PROTOCOL_VERSION, 1, 1, 0]),
            f"bad magic b'LMCX' (expected {m.MAGIC!r}): is this an lmcache-node client?",
        ),
        (
            msgspec.msgpack.encode([m.MAGIC, 99, 1, 1, 0]),
            f"protocol version 99 is not supported (server speaks {m.PROTOCOL_VERSION}): "
            "upgrade the client or the server so they match",
        ),
    ],
)
def test_bad_headers_say_what_is_wrong(frame: bytes, message: str) -> None:
    with pytest.raises(FrameError) as info:
        decode_header(frame)
    assert info.value.message.startswith(message)
    assert str(info.value) == info.value.message


def test_errors_name_the_op_or_the_type() -> None:
    with pytest.raises(FrameError) as info:
        op_of(m.Header(m.MAGIC, m.PROTOCOL_VERSION, 77, 1))
    known = ", ".join(op.name for op in m.Op)
    assert info.value.message == f"unknown op 77; known ops: {known}"
    with pytest.raises(FrameError) as info:
        decode_payload(msgspec.msgpack.encode({"keys": [1, 2]}), m.LookupRequest)
    assert info.value.message.startswith("invalid LookupRequest: ")
    with pytest.raises(FrameError) as info:
        decode_payload(b"\xc1", m.LookupRequest)
    assert info.value.code is m.ErrorCode.BAD_FRAME
    assert info.value.message.startswith("payload of LookupRequest is not msgpack: ")
