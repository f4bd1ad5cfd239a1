"""Raw ZMQ helpers for the server tests: a DEALER (with CURVE keys or without) and one
request/reply exchange."""

from __future__ import annotations

import zmq
from lmcache_node.protocol import messages as m
from lmcache_node.protocol.codec import decode_header
from lmcache_node.protocol.credentials import ClientCredentials


def curve_dealer(
    endpoint: str, credentials: ClientCredentials | None, routing_id: bytes | None = None
) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    if credentials is not None:
        credentials.apply(sock)
    sock.connect(endpoint)
    return sock


def maybe_exchange(
    sock: zmq.Socket, frames: list[bytes], timeout_ms: int = 1500
) -> tuple[m.Header, bytes] | None:
    """Send ``frames``; the reply, or None when none comes within ``timeout_ms``."""
    sock.send_multipart(frames)
    if not sock.poll(timeout_ms):
        return None
    reply = sock.recv_multipart()
    assert len(reply) == 2, reply
    return decode_header(reply[0]), reply[1]


def exchange(sock: zmq.Socket, frames: list[bytes]) -> tuple[m.Header, bytes]:
    reply = maybe_exchange(sock, frames, timeout_ms=10_000)
    assert reply is not None, "the server did not answer within 10 s"
    return reply


def engine_registration(layers: int = 1, staging_chunks: int = 1) -> m.RegisterRequest:
    """An engine-mode registration of CPU tensors [blocks=8, block_size=16, 4 bytes]."""
    return m.RegisterRequest(
        worker_id=0,
        layout="test",
        block_dim=0,
        block_size=16,
        layers=[
            m.LayerDesc(dtype="uint8", shape=[8, 16, 4], stride=[64, 4, 1], segment=i)
            for i in range(layers)
        ],
        segments=[m.SegmentDesc(kind="shm", nbytes=8 * 64, name="") for _ in range(layers)],
        transfer_mode="engine",
        staging_chunks=staging_chunks,
    )
