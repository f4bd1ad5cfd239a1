"""A session's locks and registrations are its own: another session gets ``forbidden``."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest
import zmq
from lmcache_node.protocol import messages as m
from lmcache_node.protocol.codec import decode_payload, encode_request
from lmcache_node.server.process import ServerProcess

from tests.node.server.wire import curve_dealer, engine_registration, exchange

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("owner") / "server.log"
    with ServerProcess(
        "--chunk-size", "64", "--cpu-buffer-size", "0.05", "--l1-page-size", "4096",
        log_file=log,
    ) as proc:  # fmt: skip
        yield proc


@pytest.fixture
def pair(server: ServerProcess) -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    owner, other = curve_dealer(server.endpoint, None), curve_dealer(server.endpoint, None)
    for sock in (owner, other):
        exchange(sock, encode_request(m.Op.HANDSHAKE, 1, m.HandshakeRequest("t")))
    yield owner, other
    owner.close(0)
    other.close(0)


def reply_of(sock: zmq.Socket, op: m.Op, payload: msgspec.Struct) -> msgspec.Struct:
    header, body = exchange(sock, encode_request(op, 3, payload))
    if header.status != m.Status.OK:
        return decode_payload(body, m.ErrorReply)
    return decode_payload(body, m.REPLY_TYPES[op])


def stored_lock(sock: zmq.Socket) -> tuple[int, int]:
    """Register, store one chunk from the staging area, lock it: (registration, lock id)."""
    registered = reply_of(sock, m.Op.REGISTER, engine_registration())
    assert isinstance(registered, m.RegisterReply)
    key = b"owned-chunk-key!"
    stored = reply_of(
        sock, m.Op.STORE, m.StoreRequest(registered.registration_id, [key], [0, 1, 2, 3])
    )
    assert isinstance(stored, m.StoreReply) and stored.stored == 1
    found = reply_of(sock, m.Op.LOOKUP, m.LookupRequest(keys=[key], lock=True, lock_ttl_s=30))
    assert isinstance(found, m.LookupReply) and found.hits == 1 and found.lock_id is not None
    return registered.registration_id, found.lock_id


def test_another_session_cannot_free_a_lock(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    owner, other = pair
    _, lock_id = stored_lock(owner)
    refused = reply_of(other, m.Op.FREE_LOCK, m.FreeLockRequest(lock_ids=[lock_id]))
    assert isinstance(refused, m.ErrorReply)
    assert refused.code == m.ErrorCode.FORBIDDEN.value
    assert str(lock_id) in refused.message
    freed = reply_of(owner, m.Op.FREE_LOCK, m.FreeLockRequest(lock_ids=[lock_id]))
    assert isinstance(freed, m.FreeLockReply) and freed.freed == 1  # it was still held


def test_another_session_cannot_use_or_remove_a_registration(
    pair: tuple[zmq.Socket, zmq.Socket],
) -> None:
    owner, other = pair
    registration_id, _ = stored_lock(owner)
    for op, payload in [
        (m.Op.UNREGISTER, m.UnregisterRequest(registration_id)),
        (m.Op.STORE, m.StoreRequest(registration_id, [b"x" * 16], [0, 1, 2, 3])),
        (m.Op.RETRIEVE, m.RetrieveRequest(registration_id, [b"owned-chunk-key!"], [0, 1, 2, 3])),
    ]:
        refused = reply_of(other, op, payload)
        assert isinstance(refused, m.ErrorReply), op
        assert refused.code == m.ErrorCode.FORBIDDEN.value, (op, refused)
        assert "another session" in refused.message
    removed = reply_of(owner, m.Op.UNREGISTER, m.UnregisterRequest(registration_id))
    assert isinstance(removed, m.UnregisterReply) and removed.removed


def test_unknown_ids_are_not_forbidden_but_unknown(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    owner, _ = pair
    gone = reply_of(owner, m.Op.UNREGISTER, m.UnregisterRequest(987654))
    assert isinstance(gone, m.UnregisterReply) and not gone.removed
    freed = reply_of(owner, m.Op.FREE_LOCK, m.FreeLockRequest(lock_ids=[987654]))
    assert isinstance(freed, m.FreeLockReply) and freed.freed == 0
