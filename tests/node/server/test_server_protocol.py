"""Raw frames against a real server: every request, good or bad, gets exactly one reply."""

from __future__ import annotations

import msgspec
import pytest
import zmq
from lmcache_node.protocol import messages as m
from lmcache_node.protocol.codec import decode_header, decode_payload, encode_request
from lmcache_node.server.process import ServerProcess

pytestmark = pytest.mark.integration  # real server processes / subprocesses

enc = msgspec.msgpack.encode


def ask(sock: zmq.Socket, frames: list[bytes]) -> tuple[m.Header, bytes]:
    sock.send_multipart(frames)
    reply = sock.recv_multipart()
    assert len(reply) == 2
    return decode_header(reply[0]), reply[1]


def error_of(sock: zmq.Socket, frames: list[bytes]) -> m.ErrorReply:
    header, body = ask(sock, frames)
    assert header.status == m.Status.ERROR
    return decode_payload(body, m.ErrorReply)


def handshake(sock: zmq.Socket) -> None:
    header, body = ask(sock, encode_request(m.Op.HANDSHAKE, 1, m.HandshakeRequest("test")))
    assert header.status == m.Status.OK
    assert decode_payload(body, m.HandshakeReply).chunk_size == 64


def test_ping_needs_a_session_first(dealer: zmq.Socket) -> None:
    err = error_of(dealer, encode_request(m.Op.PING, 7, m.PingRequest()))
    assert err.code == "no_session"
    handshake(dealer)
    header, body = ask(dealer, encode_request(m.Op.PING, 8, m.PingRequest()))
    assert header.status == m.Status.OK and header.request_id == 8 and header.op == m.Op.PING
    assert decode_payload(body, m.PingReply).server_time > 0


def hdr(op: int, version: int = m.PROTOCOL_VERSION, magic: bytes = m.MAGIC) -> bytes:
    return enc([magic, version, op, 1, 0])


LOOKUP = int(m.Op.LOOKUP)
STORE_BODY = {"registration_id": 5, "keys": [b"k" * 16], "block_ids": [0]}


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"only one frame"], "bad_frame"),
        ([b"a", b"b", b"c"], "bad_frame"),
        ([b"\xc1garbage", b""], "bad_frame"),
        ([hdr(10, magic=b"XXXX"), enc({})], "bad_frame"),
        ([hdr(10, version=99), enc({})], "bad_version"),
        ([hdr(999), enc({})], "unknown_op"),
        ([hdr(LOOKUP), b"\xc1"], "bad_frame"),
        ([hdr(LOOKUP), enc({"keys": "x"})], "bad_request"),
        ([hdr(LOOKUP), enc({"nope": 1})], "bad_request"),
        ([hdr(int(m.Op.STORE)), enc(STORE_BODY)], "not_registered"),
        ([hdr(LOOKUP), enc({"keys": [b"short"]})], "bad_request"),
        ([hdr(LOOKUP), enc({"keys": [], "lock_ttl_s": -1.0})], "bad_request"),
    ],
)  # fmt: skip
def test_malformed_requests_get_typed_errors(
    dealer: zmq.Socket, frames: list[bytes], code: str
) -> None:
    handshake(dealer)
    err = error_of(dealer, frames)
    assert err.code == code
    assert err.message
    header, _ = ask(dealer, encode_request(m.Op.PING, 2, m.PingRequest()))  # still serving
    assert header.status == m.Status.OK


def test_pickle_is_never_accepted(dealer: zmq.Socket) -> None:
    import pickle

    handshake(dealer)
    frames = [
        enc([m.MAGIC, m.PROTOCOL_VERSION, int(m.Op.LOOKUP), 3, 0]),
        pickle.dumps({"keys": []}),
    ]
    assert error_of(dealer, frames).code in {"bad_frame", "bad_request"}


def test_register_with_a_missing_segment_is_refused(dealer: zmq.Socket) -> None:
    handshake(dealer)
    request = m.RegisterRequest(
        worker_id=0,
        layout="vllm-cpu",
        block_dim=0,
        block_size=16,
        layers=[m.LayerDesc("float16", [4, 16, 8], [128, 8, 1])],
        segments=[m.SegmentDesc("shm", 1024, name="lmcache-node-kv-1-0123456789abcdef")],
    )
    err = error_of(dealer, encode_request(m.Op.REGISTER, 4, request))
    assert err.code == "registration_failed"
    assert "/dev/shm" in err.message
    request.segments = [m.SegmentDesc("shm", 1024, name="../../etc/passwd")]
    err = error_of(dealer, encode_request(m.Op.REGISTER, 5, request))
    assert err.code == "registration_failed"
    assert "'../../etc/passwd' is refused" in err.message


def test_a_burst_of_requests_gets_one_reply_each(dealer: zmq.Socket, server: ServerProcess) -> None:
    handshake(dealer)
    count = 500
    for request_id in range(100, 100 + count):
        op = m.Op.PING if request_id % 3 else m.Op.LOOKUP
        payload = m.PingRequest() if op is m.Op.PING else m.LookupRequest(keys=[b"k" * 16])
        dealer.send_multipart(encode_request(op, request_id, payload))
    seen = set()
    for _ in range(count):
        header = decode_header(dealer.recv_multipart()[0])
        assert header.status == m.Status.OK
        seen.add(header.request_id)
    assert seen == set(range(100, 100 + count))
    dealer.setsockopt(zmq.RCVTIMEO, 300)
    with pytest.raises(zmq.Again):  # and not one more
        dealer.recv_multipart()
