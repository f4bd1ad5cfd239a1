"""Keeps a ``NodeIndex`` in step with one node server: a snapshot, then its events.

The snapshot comes from the request port (handshake, ``SNAPSHOT``, end of session, on a
short-lived DEALER); it names the events port, which a SUB socket then follows. Batches
numbered right after the snapshot's are applied in order; a gap, another epoch (the server
restarted), or silence longer than ``silence_s`` (heartbeats come every second) starts
over from a new snapshot, at most one per ``min_resync_s``. A periodic resync every
``resync_secs`` heals anything the stream could not say. While a node is not in step its
index is marked unsynced and the router gives it no cache credit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from typing import TypeVar
from urllib.parse import urlparse

import msgspec
import zmq
import zmq.asyncio

from lmcache_node import __version__
from lmcache_node.keys import HASH_ALGORITHM
from lmcache_node.protocol import events as ev
from lmcache_node.protocol import messages as m
from lmcache_node.protocol.codec import FrameError, decode_header, decode_payload, encode_request
from lmcache_node.protocol.credentials import ClientCredentials
from lmcache_node.router.index import NodeIndex

log = logging.getLogger(__name__)

T = TypeVar("T", bound=msgspec.Struct)
_MAX_BATCH_BYTES = 4 * 1024**2  # a batch holds at most 8192 digests and the namespaces


class FeedError(Exception):
    """The node server cannot be followed right now; the message says why."""


class NodeFeed:
    def __init__(
        self,
        index: NodeIndex,
        endpoint: str,
        *,
        context: zmq.asyncio.Context,
        credentials: ClientCredentials | None = None,
        timeout_s: float = 5.0,
        silence_s: float = 3.5,
        resync_secs: float = 300.0,
        min_resync_s: float = 0.5,
        max_snapshot_bytes: int = 64 * 1024**2,
    ) -> None:
        self.index = index
        self.endpoint = endpoint
        self.host = urlparse(endpoint).hostname or "127.0.0.1"
        self.context = context
        self.credentials = credentials
        self.timeout_s = timeout_s
        self.silence_s = silence_s
        self.resync_secs = resync_secs
        self.min_resync_s = min_resync_s
        self.max_snapshot_bytes = max_snapshot_bytes
        self.chunk_size = 0
        self.epoch = 0
        self.expected = 0  # the next batch number to apply
        self.resyncs: Counter[str] = Counter()  # by reason
        self.batches_applied = 0
        self.last_error = ""
        self._last_snapshot = float("-inf")
        self._stopped = asyncio.Event()

    # ----- lifecycle -----
    async def run(self) -> None:
        """Follow the node until ``stop``; failures are logged and retried with backoff."""
        backoff = 0.5
        while not self._stopped.is_set():
            try:
                await self._follow()
                backoff = 0.5
            except FeedError as exc:
                self._unsync(str(exc))
            except (zmq.ZMQError, OSError) as exc:
                self._unsync(f"{type(exc).__name__}: {exc}")
            if self._stopped.is_set():
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), backoff)
            backoff = min(backoff * 2, 10.0)

    def stop(self) -> None:
        self._stopped.set()

    def _unsync(self, why: str) -> None:
        if self.index.synced or why != self.last_error:
            log.warning("node %s (%s): not in step (%s); retrying", self.index.name,
                        self.endpoint, why)  # fmt: skip
        self.index.synced = False
        self.last_error = why

    # ----- the stream -----
    async def _follow(self) -> None:
        probe = await self.snapshot(with_keys=False)
        if not probe.events_port:
            raise FeedError("the node server publishes no events (events_port 0)")
        sub = self.context.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.MAXMSGSIZE, _MAX_BATCH_BYTES)
            _secure(sub, self.credentials)
            sub.setsockopt(zmq.SUBSCRIBE, ev.TOPIC)
            sub.connect(f"tcp://{_host(self.host)}:{probe.events_port}")
            # The first message (a heartbeat comes every second) proves the subscription
            # is live: the snapshot after it misses nothing.
            first = await self._receive(sub)
            self._apply_snapshot(await self.snapshot(), "connect")
            await self._consume(sub, first)
        finally:
            sub.close(0)

    async def _receive(self, sub: zmq.asyncio.Socket) -> list[bytes]:
        try:
            return list(await asyncio.wait_for(sub.recv_multipart(), self.silence_s))
        except asyncio.TimeoutError:
            raise FeedError(
                f"no event or heartbeat for {self.silence_s:.1f} s (node server down, or "
                "its events port unreachable or refusing our credentials)"
            ) from None

    async def _consume(self, sub: zmq.asyncio.Socket, frames: list[bytes]) -> None:
        next_periodic = time.monotonic() + self.resync_secs
        while not self._stopped.is_set():
            try:
                batch = ev.decode_batch(frames)
            except ev.EventDecodeError as exc:
                await self._resync(f"bad batch ({exc})")
            else:
                reason = self._apply(batch)
                if reason is None and time.monotonic() >= next_periodic:
                    reason = "periodic"
                if reason is not None:
                    await self._resync(reason)
                    next_periodic = time.monotonic() + self.resync_secs
            frames = await self._receive(sub)

    def _apply(self, batch: ev.EventBatch) -> str | None:
        """Apply ``batch`` if it is the next one; else the reason to resync (or None to
        skip a batch the snapshot already covers)."""
        if batch.epoch != self.epoch:
            return "epoch"
        if not batch.events and batch.namespaces is None:  # heartbeat: the last number
            return "gap" if batch.seq >= self.expected else None
        if batch.seq < self.expected:
            return None  # covered by the snapshot
        if batch.seq > self.expected:
            return "gap"
        index = self.index
        for event in batch.events:
            if event.kind == ev.EventKind.STORED.value:
                index.stored(event.tier, ev.split_digests(event.digests))
            elif event.kind == ev.EventKind.EVICTED.value:
                index.evicted(event.tier, ev.split_digests(event.digests))
            elif event.kind == ev.EventKind.CLEARED.value:
                index.cleared(event.tier)
        if batch.namespaces is not None:
            index.namespaces = list(batch.namespaces)
        self.expected = batch.seq + 1
        self.batches_applied += 1
        return None

    async def _resync(self, reason: str) -> None:
        log.info("node %s: resynchronising (%s)", self.index.name, reason)
        wait = self._last_snapshot + self.min_resync_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self.index.synced = False
        self._apply_snapshot(await self.snapshot(), reason)

    def _apply_snapshot(self, reply: m.SnapshotReply, reason: str) -> None:
        self.index.replace(reply.tiers)
        self.index.namespaces = list(reply.namespaces)
        self.chunk_size = reply.chunk_size
        self.epoch = reply.epoch
        self.expected = reply.seq + 1
        self.index.synced = True
        self.resyncs[reason] += 1
        self.last_error = ""
        log.info(
            "node %s: in step after %s (epoch %x, batch %d, %d keys, %d namespace(s)%s)",
            self.index.name, reason, reply.epoch, reply.seq, len(self.index.entries),
            len(reply.namespaces),
            f"; truncated: {', '.join(reply.truncated)}" if reply.truncated else "",
        )  # fmt: skip

    # ----- the request port -----
    async def snapshot(self, *, with_keys: bool = True) -> m.SnapshotReply:
        """Handshake, SNAPSHOT and end the session on a short-lived DEALER."""
        self._last_snapshot = time.monotonic()
        sock = self.context.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_snapshot_bytes)
            _secure(sock, self.credentials)
            sock.connect(self.endpoint)
            hello = m.HandshakeRequest(
                client_version=__version__, pid=os.getpid(), hostname=socket.gethostname()[:255]
            )
            info = await self._call(sock, m.Op.HANDSHAKE, hello, m.HandshakeReply)
            if info.hash_algorithm != HASH_ALGORITHM:
                raise FeedError(
                    f"the node server keys chunks with {info.hash_algorithm}, this router with "
                    f"{HASH_ALGORITHM}: run the same lmcache-k8s version on both"
                )
            ask = m.SnapshotRequest(with_keys=with_keys)
            reply = await self._call(sock, m.Op.SNAPSHOT, ask, m.SnapshotReply)
            try:
                await self._call(sock, m.Op.END_SESSION, m.EndSessionRequest(),
                                 m.EndSessionReply, timeout_s=1.0)  # fmt: skip
            except FeedError as exc:
                log.debug("node %s: ending the snapshot session failed: %s", self.index.name, exc)
            return reply
        finally:
            sock.close(0)

    async def _call(
        self,
        sock: zmq.asyncio.Socket,
        op: m.Op,
        payload: msgspec.Struct,
        reply_type: type[T],
        timeout_s: float | None = None,
    ) -> T:
        await sock.send_multipart(encode_request(op, 1, payload))
        wait = self.timeout_s if timeout_s is None else timeout_s
        try:
            frames = await asyncio.wait_for(sock.recv_multipart(), wait)
        except asyncio.TimeoutError:
            raise FeedError(
                f"{op.name.lower()} got no answer from {self.endpoint} within {wait:.1f} s "
                "(down, or refusing this router's credentials: check "
                "LMCACHE_NODE_CREDENTIALS_DIR)"
            ) from None
        try:
            if len(frames) != 2:
                raise FeedError(f"{op.name.lower()}: a reply has 2 frames, got {len(frames)}")
            header = decode_header(frames[0])
            if header.status != m.Status.OK:
                error = decode_payload(frames[1], m.ErrorReply)
                raise FeedError(f"{op.name.lower()} refused: {error.code}: {error.message}")
            return decode_payload(frames[1], reply_type)
        except FrameError as exc:
            raise FeedError(f"{op.name.lower()}: {exc.message}") from None


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _secure(sock: zmq.asyncio.Socket, credentials: ClientCredentials | None) -> None:
    """A CURVE client of the node server (before connect); plain without credentials."""
    if credentials is not None:
        sock.curve_secretkey = credentials.secret_key
        sock.curve_publickey = credentials.public_key
        sock.curve_serverkey = credentials.server_public_key
