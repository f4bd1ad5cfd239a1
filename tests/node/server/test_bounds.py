"""Every size, count and time a client controls has a server-side bound with a typed error.

A real server process on loopback with small ``max_*`` limits, spoken to with raw frames.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from lmcache_node.protocol import messages as m
from lmcache_node.protocol.codec import decode_header, decode_payload, encode_request
from lmcache_node.server.process import ServerProcess

from tests.node.server.wire import curve_dealer, engine_registration, exchange, maybe_exchange

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMITS = {
    "--max-lock-ttl-secs": "60",
    "--max-locks-per-session": "3",
    "--max-keys-per-request": "16",
    "--max-registrations-per-session": "2",
    "--max-layers-per-registration": "4",
    "--max-segments-per-registration": "4",
    "--max-staging-chunks-per-session": "16",
    "--max-staging-bytes-per-session": "1Mi",
    "--max-sessions": "6",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("bounds") / "server.log"
    args = [item for pair in LIMITS.items() for item in pair]
    proc = ServerProcess(
        *args, "--chunk-size", "64", "--cpu-buffer-size", "0.05", "--l1-page-size", "4096",
        "--max-workers", "2", log_file=log,
    )  # fmt: skip
    with proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> Iterator[zmq.Socket]:
    sock = curve_dealer(server.endpoint, None)
    header, _ = exchange(sock, encode_request(m.Op.HANDSHAKE, 1, m.HandshakeRequest("t")))
    assert header.status == m.Status.OK
    yield sock
    exchange(sock, encode_request(m.Op.END_SESSION, 2, m.EndSessionRequest()))
    sock.close(0)


def call(sock: zmq.Socket, op: m.Op, payload: msgspec.Struct) -> tuple[m.Header, bytes]:
    return exchange(sock, encode_request(op, 9, payload))


def error(sock: zmq.Socket, op: m.Op, payload: msgspec.Struct) -> m.ErrorReply:
    header, body = call(sock, op, payload)
    assert header.status == m.Status.ERROR, decode_payload(body, m.REPLY_TYPES[op])
    return decode_payload(body, m.ErrorReply)


@pytest.mark.parametrize("ttl", [float("inf"), float("nan"), -1.0, 0.0])
def test_a_lock_ttl_must_be_a_positive_finite_number(client: zmq.Socket, ttl: float) -> None:
    err = error(client, m.Op.LOOKUP, m.LookupRequest(keys=[b"k" * 16], lock=True, lock_ttl_s=ttl))
    assert err.code == m.ErrorCode.BAD_REQUEST.value
    assert "lock_ttl_s" in err.message


def test_a_lock_ttl_above_the_cap_is_refused(client: zmq.Socket) -> None:
    req = m.LookupRequest(keys=[b"k" * 16], lock=True, lock_ttl_s=61.0)
    err = error(client, m.Op.LOOKUP, req)
    assert err.code == m.ErrorCode.LIMIT_EXCEEDED.value
    assert "max_lock_ttl_secs" in err.message


def test_too_many_keys_in_one_request(client: zmq.Socket) -> None:
    keys = [bytes([i]) * 16 for i in range(17)]
    err = error(client, m.Op.LOOKUP, m.LookupRequest(keys=keys))
    assert err.code == m.ErrorCode.LIMIT_EXCEEDED.value
    assert "max_keys_per_request" in err.message
    _, body = call(client, m.Op.LOOKUP, m.LookupRequest(keys=keys[:16]))
    assert decode_payload(body, m.LookupReply).hits == 0


def test_lock_ids_of_a_free_request_are_bounded(client: zmq.Socket) -> None:
    err = error(client, m.Op.FREE_LOCK, m.FreeLockRequest(lock_ids=list(range(4))))
    assert err.code == m.ErrorCode.LIMIT_EXCEEDED.value


def test_registrations_per_session_are_bounded(client: zmq.Socket) -> None:
    ids = []
    for _ in range(2):
        _, body = call(client, m.Op.REGISTER, engine_registration())
        ids.append(decode_payload(body, m.RegisterReply).registration_id)
    err = error(client, m.Op.REGISTER, engine_registration())
    assert err.code == m.ErrorCode.LIMIT_EXCEEDED.value
    assert "max_registrations_per_session" in err.message
    _, body = call(client, m.Op.UNREGISTER, m.UnregisterRequest(registration_id=ids[0]))
    assert decode_payload(body, m.UnregisterReply).removed
    header, _ = call(client, m.Op.REGISTER, engine_registration())
    assert header.status == m.Status.OK


def test_layers_and_segments_per_registration_are_bounded(client: zmq.Socket) -> None:
    err = error(client, m.Op.REGISTER, engine_registration(layers=5))
    assert err.code == m.ErrorCode.LIMIT_EXCEEDED.value
    assert "max_layers_per_registration" in err.message
    request = engine_registration(layers=1)
    request.segments = request.segments * 5
    err = error(client, m.Op.REGISTER, request)
    assert "max_segments_per_registration" in err.message


def test_staging_memory_per_session_is_bounded(client: zmq.Socket) -> None:
    # chunk = 4 blocks of 64 bytes: 17 chunks exceed 16 staging chunks
    err = error(client, m.Op.REGISTER, engine_registration(staging_chunks=17))
    assert err.code == m.ErrorCode.LIMIT_EXCEEDED.value
    assert "max_staging_chunks_per_session" in err.message
    # chunk = 4 blocks of 64 KiB = 256 KiB: 4 chunks fill the 1 MiB allowed, one more does not
    big = engine_registration(staging_chunks=4)
    big.layers = [m.LayerDesc(dtype="uint8", shape=[8, 16, 4096], stride=[65536, 4096, 1])]
    big.segments = [m.SegmentDesc(kind="shm", nbytes=8 * 65536)]
    header, _ = call(client, m.Op.REGISTER, big)
    assert header.status == m.Status.OK
    big.staging_chunks = 1
    err = error(client, m.Op.REGISTER, big)
    assert err.code == m.ErrorCode.LIMIT_EXCEEDED.value
    assert "max_staging_bytes_per_session" in err.message


def test_sessions_are_bounded(server: ServerProcess) -> None:
    sockets = [curve_dealer(server.endpoint, None) for _ in range(8)]
    try:
        codes = []
        for sock in sockets:
            header, body = exchange(
                sock, encode_request(m.Op.HANDSHAKE, 1, m.HandshakeRequest("t"))
            )
            codes.append(
                "ok" if header.status == m.Status.OK else decode_payload(body, m.ErrorReply).code
            )
        assert "limit_exceeded" in codes
        assert codes.count("ok") <= 6
    finally:
        for sock in sockets:
            maybe_exchange(sock, encode_request(m.Op.END_SESSION, 2, m.EndSessionRequest()))
            sock.close(0)


def test_a_geometry_bomb_is_refused_while_others_are_served(server: ServerProcess) -> None:
    """169 bytes that once stalled the server for seconds: 2**40 outer indices per block."""
    bomber = curve_dealer(server.endpoint, None)
    bystander = curve_dealer(server.endpoint, None)
    try:
        for sock in (bomber, bystander):
            exchange(sock, encode_request(m.Op.HANDSHAKE, 1, m.HandshakeRequest("t")))
        bomb = m.RegisterRequest(
            worker_id=0,
            layout="x",
            block_dim=1,
            block_size=16,
            layers=[m.LayerDesc(dtype="uint8", shape=[1 << 40, 8, 16], stride=[0, 16, 1])],
            segments=[m.SegmentDesc(kind="shm", nbytes=1 << 20)],
            transfer_mode="engine",
        )
        frames = encode_request(m.Op.REGISTER, 7, bomb)
        assert sum(len(f) for f in frames) < 200
        pings: list[bool] = []

        def ping_meanwhile() -> None:
            for n in range(20):
                reply = maybe_exchange(
                    bystander, encode_request(m.Op.PING, 100 + n, m.PingRequest()), 2000
                )
                pings.append(reply is not None and reply[0].status == m.Status.OK)

        thread = threading.Thread(target=ping_meanwhile)
        thread.start()
        reply = maybe_exchange(bomber, frames, timeout_ms=2000)
        thread.join()
        assert reply is not None, "the bomb was not answered within 2 s"
        header, body = reply
        assert header.status == m.Status.ERROR
        err = decode_payload(body, m.ErrorReply)
        assert err.code == m.ErrorCode.REGISTRATION_FAILED.value
        assert "byte runs per block" in err.message
        assert all(pings) and len(pings) == 20
    finally:
        bomber.close(0)
        bystander.close(0)


def test_a_full_queue_answers_busy_and_every_request_gets_one_reply(tmp_path: Path) -> None:
    with ServerProcess(
        "--max-queued-requests", "1", "--max-workers", "1", "--cpu-buffer-size", "0.05",
        log_file=tmp_path / "busy.log",
    ) as proc:  # fmt: skip
        sock = curve_dealer(proc.endpoint, None)
        try:
            exchange(sock, encode_request(m.Op.HANDSHAKE, 1, m.HandshakeRequest("t")))
            keys = [bytes([i % 256]) * 16 for i in range(4096)]
            count = 300
            for request_id in range(1000, 1000 + count):
                sock.send_multipart(encode_request(m.Op.LOOKUP, request_id, m.LookupRequest(keys)))
            seen: dict[int, str] = {}
            for _ in range(count):
                assert sock.poll(20_000), f"only {len(seen)} of {count} replies"
                header_frame, body = sock.recv_multipart()
                header = decode_header(header_frame)
                outcome = "ok"
                if header.status != m.Status.OK:
                    outcome = decode_payload(body, m.ErrorReply).code
                assert header.request_id not in seen
                seen[header.request_id] = outcome
            assert set(seen) == set(range(1000, 1000 + count))
            assert "busy" in seen.values() and "ok" in seen.values()
            assert set(seen.values()) <= {"ok", "busy"}
        finally:
            sock.close(0)


def test_a_message_above_max_message_bytes_drops_only_its_sender(tmp_path: Path) -> None:
    with ServerProcess(
        "--max-message-bytes", "65536", "--cpu-buffer-size", "0.05",
        log_file=tmp_path / "maxmsg.log",
    ) as proc:  # fmt: skip
        big = curve_dealer(proc.endpoint, None)
        fine = curve_dealer(proc.endpoint, None)
        try:
            frames = encode_request(m.Op.HANDSHAKE, 1, m.HandshakeRequest("x" * 70_000))
            assert maybe_exchange(big, frames, timeout_ms=1500) is None
            header, _ = exchange(fine, encode_request(m.Op.HANDSHAKE, 1, m.HandshakeRequest("t")))
            assert header.status == m.Status.OK
        finally:
            big.close(0)
            fine.close(0)


# ----- fuzzing: thousands of frames, zero internal errors -----
def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 2 else 7)
    if kind == 0:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64 - 1, 2**40, 7])
    if kind == 1:
        return rng.choice([0.0, -0.0, 1e308, float("inf"), float("-inf"), float("nan"), 0.5])
    if kind == 2:
        return rng.randbytes(rng.choice([0, 1, 15, 16, 17, 64]))
    if kind == 3:
        return rng.choice(["", "cpu", "cuda", "engine", "shared", "shm", "x" * 300, "\u00e9"])
    if kind in (4, 5):
        return rng.choice([True, False, None])
    if kind == 6:
        return rng.randint(-5, 70)
    if kind in (7, 8):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice(_FIELDS): _value(rng, depth + 1) for _ in range(rng.randrange(6))}


_FIELDS = sorted(
    {name for cls in m.REQUEST_TYPES.values() for name in cls.__struct_fields__}
    | {"dtype", "shape", "stride", "storage_offset", "segment", "kind", "nbytes", "name", "cuda"}
)


_INTS = [0, 1, 2, 3, 7, 16, 64, -1, 2**31, 2**40, 2**62, -(2**63), 2**64 - 1]
_FLOATS = [0.0, 0.5, 30.0, 61.0, 1e308, float("inf"), float("-inf"), float("nan"), -1.0]
_STRS = ["", "cpu", "cuda", "xpu", "engine", "shared", "shm", "cuda_ipc", "uint8", "x" * 300]


def _layer(rng: random.Random) -> dict[str, Any]:
    ndim = rng.randrange(1, 5)
    return {
        "dtype": rng.choice(["uint8", "float16", "bfloat16", "bogus"]),
        "shape": [rng.choice([1, 2, 8, 16, 2**40, 0, -1]) for _ in range(ndim)],
        "stride": [rng.choice([0, 1, 4, 64, 2**40, -1]) for _ in range(rng.choice([ndim, 2]))],
        "storage_offset": rng.choice([0, 0, 8, -1, 2**50]),
        "segment": rng.choice([0, 0, 1, -1, 2**40]),
    }


def _typed(rng: random.Random, annotation: Any) -> Any:
    """A value of the field's own type, often at or beyond an edge."""
    text = str(annotation)
    if "LayerDesc" in text:
        return [_layer(rng) for _ in range(rng.choice([0, 1, 2, 5]))]
    if "SegmentDesc" in text:
        return [
            {"kind": rng.choice(["shm", "cuda_ipc", "x"]), "nbytes": rng.choice(_INTS),
             "name": rng.choice(["", "lmcache-node-kv-1-" + "0" * 16, "../etc/passwd"])}
            for _ in range(rng.choice([0, 1, 2, 5]))
        ]  # fmt: skip
    if "list[bytes]" in text:
        count = rng.choice([0, 1, 4, 17])
        return [rng.randbytes(rng.choice([16, 16, 16, 15])) for _ in range(count)]
    if "list[int]" in text:
        return [rng.choice(_INTS[:8]) for _ in range(rng.choice([0, 1, 4, 9]))]
    if "float" in text:
        return rng.choice([*_FLOATS, None]) if "None" in text else rng.choice(_FLOATS)
    if "bool" in text:
        return rng.random() < 0.5
    if "int" in text:
        return rng.choice(_INTS)
    if "bytes" in text:
        return rng.randbytes(rng.choice([0, 16, 64]))
    if "str" in text:
        return rng.choice(_STRS)
    return _value(rng)


def _mutated(rng: random.Random, op: m.Op, known: list[int]) -> dict[str, Any] | None:
    """A valid request of ``op`` with one or two fields made hostile (reaches deep checks)."""
    if op is m.Op.REGISTER:
        payload: dict[str, Any] = msgspec.to_builtins(engine_registration())
        for _ in range(rng.randrange(1, 3)):
            target = rng.choice(["top", "layer", "segment"])
            if target == "layer":
                layer = payload["layers"][0]
                field = rng.choice(["shape", "stride", "storage_offset", "segment", "dtype"])
                layer[field] = _layer(rng)[field]
            elif target == "segment":
                payload["segments"][0]["nbytes"] = rng.choice(_INTS)
            else:
                field = rng.choice(["block_dim", "block_size", "staging_chunks", "worker_id"])
                payload[field] = rng.choice(_INTS[:8])
        return payload
    if op in (m.Op.STORE, m.Op.RETRIEVE):
        keys = [rng.randbytes(16) for _ in range(rng.choice([1, 2, 3]))]
        blocks = [rng.choice([0, 1, 2, 3, 7, 8, 9, -1]) for _ in range(rng.choice([1, 4, 8, 12]))]
        reg_id = known[-1] if known and rng.random() < 0.7 else rng.randrange(1, 400)
        return {"registration_id": reg_id, "keys": keys, "block_ids": blocks}
    if op is m.Op.UNREGISTER:
        return {"registration_id": rng.randrange(1, 400)}
    return None


def _structured(rng: random.Random, op: m.Op, known: list[int]) -> bytes:
    """A payload of ``op``'s schema with hostile values; sometimes a wrong type."""
    mutated = _mutated(rng, op, known) if rng.random() < 0.5 else None
    if mutated is not None:
        return msgspec.msgpack.encode(mutated)
    cls = m.REQUEST_TYPES[op]
    payload: dict[str, Any] = {}
    for info in msgspec.structs.fields(cls):
        if rng.random() < 0.9:
            payload[info.encode_name] = (
                _typed(rng, info.type) if rng.random() < 0.9 else _value(rng)
            )
    return msgspec.msgpack.encode(payload)


def test_fuzzed_frames_never_get_an_internal_error(server: ServerProcess) -> None:
    rng = random.Random(20261206)
    sock = curve_dealer(server.endpoint, None)
    outcomes: dict[str, int] = {}
    registered: list[int] = []  # registration ids the server gave this session
    frames_sent = 0
    try:
        for request_id in range(1, 3201):
            choice = rng.random()
            op = rng.choice([o for o in m.Op if o is not m.Op.END_SESSION] * 4 + [m.Op.END_SESSION])
            if request_id % 20 == 1:
                frames = encode_request(m.Op.HANDSHAKE, request_id, m.HandshakeRequest("fuzz"))
            elif request_id % 20 == 2:  # a real registration, so ids in stores and retrieves
                frames = encode_request(m.Op.REGISTER, request_id, engine_registration())
            elif choice < 0.1:
                frames = [rng.randbytes(rng.randrange(40)) for _ in range(rng.randrange(1, 4))]
            elif choice < 0.3:
                header = msgspec.msgpack.encode(
                    [m.MAGIC, m.PROTOCOL_VERSION, int(op), request_id, 0]
                )
                frames = [header, msgspec.msgpack.encode(_value(rng))]
            else:
                header = msgspec.msgpack.encode(
                    [m.MAGIC, m.PROTOCOL_VERSION, int(op), request_id, 0]
                )
                frames = [header, _structured(rng, op, registered)]
            frames_sent += 1
            header_reply, body = exchange(sock, frames)
            code = "ok"
            if header_reply.status != m.Status.OK:
                code = decode_payload(body, m.ErrorReply).code
            elif header_reply.op == m.Op.REGISTER:
                registered.append(decode_payload(body, m.RegisterReply).registration_id)
            outcomes[code] = outcomes.get(code, 0) + 1
        assert frames_sent >= 3000
        assert outcomes.get(m.ErrorCode.INTERNAL.value, 0) == 0, outcomes
        reached = {
            "ok", "bad_request", "bad_frame", "limit_exceeded", "registration_failed",
            "not_registered", "out_of_range", "no_session", "incompatible",
        }  # fmt: skip
        assert reached <= set(outcomes), " ".join(sorted(outcomes))  # many answers, not one
        header_reply, _ = exchange(sock, encode_request(m.Op.PING, 1, m.PingRequest()))
        assert header_reply.status in (m.Status.OK, m.Status.ERROR)
    finally:
        sock.close(0)
