"""The events socket: batches of the keys each tier stores, evicts and clears, for routers.

Listeners on the engine (L1 commits, evictions, clear) and on the disk tier (L2 index
changes) append key digests to a bounded buffer; they never block and never wait for a
subscriber. A publisher thread owns the PUB socket: every ``events_flush_secs`` it turns the
buffer into numbered batches and sends them without blocking (ZMQ drops what a slow
subscriber cannot take; the subscriber sees the gap in the numbers and resynchronises). A
buffer that overflows is dropped as a whole and its sequence number skipped, so every
subscriber resynchronises. Snapshots (``Op.SNAPSHOT`` on the request port) flush the buffer
first and name the last batch they include. The socket is CURVE-authenticated with the
request port's server key and allowed client keys (its own context and ZAP handler).
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq
from prometheus_client import CollectorRegistry, Counter, Gauge

from lmcache_node.engine.core import CacheEngine
from lmcache_node.keys import ChunkKey
from lmcache_node.protocol import events as ev
from lmcache_node.protocol.messages import SnapshotReply
from lmcache_node.server.state import SessionTable
from lmcache_node.server.transport import Transport

log = logging.getLogger(__name__)

PREFIX = "lmcache_node_events_"
BATCH_KEYS = 8192  # keys per batch message (64 KiB of digests)
MAX_OUTBOX = 1024  # batches waiting for the publisher thread
HEARTBEAT_SECS = 1.0  # an idle publisher repeats its last number this often
SEND_HWM = 1024  # batches queued per subscriber before ZMQ drops for it
_MAX_SUBSCRIBER_MESSAGE = 4096  # subscriptions are a few bytes


class EventMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.batches = Counter(
            PREFIX + "batches", "Event batches published (heartbeats not counted).",
            registry=registry,
        )  # fmt: skip
        self.keys = Counter(
            PREFIX + "keys", "Key events published, by event and tier.", ["event", "tier"],
            registry=registry,
        )  # fmt: skip
        self.dropped = Counter(
            PREFIX + "dropped_keys",
            "Key events dropped before publishing (buffer or outbox full): subscribers "
            "resynchronise from a snapshot.",
            registry=registry,
        )
        self.snapshots = Counter(
            PREFIX + "snapshots", "Snapshots served, by tier.", ["tier"], registry=registry
        )
        self.sequence = Gauge(
            PREFIX + "sequence", "Number of the last event batch.", registry=registry
        )


class EventPublisher:
    """Collects key events from the engine and the disk tier and publishes them."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        transport: Transport,
        sessions: SessionTable,
        registry: CollectorRegistry,
        flush_secs: float = 0.02,
        max_pending_keys: int = 65536,
        snapshot_max_keys: int = 1 << 20,
        chunk_size: int = 256,
    ) -> None:
        self.endpoint = f"tcp://{host}:{port}"
        self.port = port
        self.epoch = secrets.randbits(62) | 1
        self.chunk_size = chunk_size
        self.flush_secs = flush_secs
        self.max_pending_keys = max_pending_keys
        self.snapshot_max_keys = snapshot_max_keys
        self.metrics = EventMetrics(registry)
        # Its own transport object: one ZAP handler per context, this one is ours.
        self._transport = Transport(transport.server, transport.allowed, transport.insecure)
        self._sessions = sessions
        self._mutex = threading.Lock()
        self._runs: list[tuple[str, str, bytearray]] = []  # (event, tier, digests) in order
        self._pending = 0
        self._seq = 0
        self._outbox: collections.deque[list[bytes]] = collections.deque()
        self._namespaces: list[ev.NamespaceInfo] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._socket: zmq.Socket[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._l1_keys: Callable[[], list[ChunkKey]] = list
        self._l2_keys: Callable[[], list[ChunkKey]] | None = None

    # ----- wiring -----
    def attach(self, engine: CacheEngine) -> None:
        """Listen to the engine (L1) and to its disk tier (L2), if it has one."""
        engine.commit_listeners.append(lambda key, _span: self.record("stored", "l1", key))
        engine.evict_listeners.append(lambda key, _span: self.record("evicted", "l1", key))
        engine.clear_listeners.append(lambda: self.record_clear("l1"))
        self._l1_keys = engine.keys
        for tier in getattr(engine.lower_tiers, "tiers", []):
            listeners = getattr(tier, "key_listeners", None)
            if tier.name == "disk" and listeners is not None:
                listeners.append(lambda event, key: self.record(event, "l2", key))
                self._l2_keys = tier.indexed_keys

    def start(self) -> None:
        """Bind the PUB socket (raises OSError when the port is taken) and start publishing."""
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        socket = context.socket(zmq.PUB)
        try:
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, SEND_HWM)
            socket.setsockopt(zmq.MAXMSGSIZE, _MAX_SUBSCRIBER_MESSAGE)
            self._transport.secure(context, socket)
            socket.bind(self.endpoint)
        except zmq.ZMQError as exc:
            socket.close(0)
            self._transport.close()
            context.term()
            raise OSError(
                f"cannot bind the events socket to {self.endpoint}: {exc}; pick another "
                "port with --events-port (0 disables events)"
            ) from None
        self._context, self._socket = context, socket
        self._thread = threading.Thread(target=self._loop, name="lmcache-node-events", daemon=True)
        self._thread.start()
        log.info(
            "events published on %s (%s), epoch %x", self.endpoint,
            self._transport.describe(), self.epoch,
        )  # fmt: skip

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ----- listeners (any thread, some under the engine's lock: quick, never blocking) -----
    def record(self, event: str, tier: str, key: bytes) -> None:
        with self._mutex:
            if self._pending >= self.max_pending_keys:
                self._overflow_locked()
            if self._runs and self._runs[-1][0] == event and self._runs[-1][1] == tier:
                self._runs[-1][2].extend(key[: ev.DIGEST_BYTES])
            else:
                self._runs.append((event, tier, bytearray(key[: ev.DIGEST_BYTES])))
            self._pending += 1
            full = self._pending >= BATCH_KEYS
        if full:
            self._wake.set()

    def record_clear(self, tier: str) -> None:
        with self._mutex:
            self._runs.append((ev.EventKind.CLEARED.value, tier, bytearray()))
        self._wake.set()

    def _overflow_locked(self) -> None:
        """Drop the buffer and skip a number: every subscriber sees a gap and resyncs."""
        self.metrics.dropped.inc(self._pending)
        log.warning(
            "events buffer full (%d keys, events_max_pending_keys): dropped; subscribers will "
            "resynchronise from a snapshot", self._pending,
        )  # fmt: skip
        self._runs = []
        self._pending = 0
        self._seq += 1

    # ----- batches -----
    def _flush_locked(self, namespaces: list[ev.NamespaceInfo] | None) -> None:
        """Turn the buffer into numbered, encoded batches in the outbox (FIFO)."""
        runs, self._runs, self._pending = self._runs, [], 0
        batches: list[list[ev.KeyEvent]] = []
        current: list[ev.KeyEvent] = []
        room = BATCH_KEYS
        for event, tier, digests in runs:
            offset = 0
            while True:
                take = min(room, (len(digests) - offset) // ev.DIGEST_BYTES)
                part = bytes(digests[offset : offset + take * ev.DIGEST_BYTES])
                if take or not digests:  # a "cleared" run has no digests
                    current.append(ev.KeyEvent(event, tier, part))
                    self.metrics.keys.labels(event=event, tier=tier).inc(take)
                offset += take * ev.DIGEST_BYTES
                room -= take
                if room == 0:
                    batches.append(current)
                    current, room = [], BATCH_KEYS
                if offset >= len(digests):
                    break
        if current:
            batches.append(current)
        if namespaces is not None and not batches:
            batches.append([])
        now = time.time()
        for index, events in enumerate(batches):
            self._seq += 1
            batch = ev.EventBatch(
                epoch=self.epoch,
                seq=self._seq,
                ts=now,
                events=events,
                namespaces=namespaces if index == 0 else None,
            )
            if len(self._outbox) >= MAX_OUTBOX:
                self._outbox.popleft()  # its number is lost: subscribers resync
                self.metrics.dropped.inc(BATCH_KEYS)
            self._outbox.append(ev.encode_batch(batch))
            self.metrics.batches.inc()
        self.metrics.sequence.set(self._seq)

    def namespaces(self) -> list[ev.NamespaceInfo]:
        """The key namespaces of the registered workers, in a stable order."""
        found = {
            (r.key_seed, r.model_name, r.worker_id, r.layout)
            for r in self._sessions.registrations()
            if r.key_seed
        }
        return [
            ev.NamespaceInfo(seed=seed, model_name=model, worker_id=worker, layout=layout)
            for seed, model, worker, layout in sorted(found)
        ]

    def _loop(self) -> None:
        assert self._socket is not None and self._context is not None
        last_sent = time.monotonic()
        try:
            while not self._stop.is_set():
                self._wake.wait(self.flush_secs)
                self._wake.clear()
                current = self.namespaces()
                with self._mutex:
                    changed = current if current != self._namespaces else None
                    self._namespaces = current
                    if self._runs or changed is not None:
                        self._flush_locked(changed)
                    outbox, self._outbox = self._outbox, collections.deque()
                    seq = self._seq
                for frames in outbox:
                    self._send(frames)
                if outbox:
                    last_sent = time.monotonic()
                elif time.monotonic() - last_sent >= HEARTBEAT_SECS:
                    self._send(ev.encode_batch(ev.EventBatch(self.epoch, seq, time.time())))
                    last_sent = time.monotonic()
        except Exception:  # the publisher must not die silently
            log.exception("the events publisher failed; routers will fall back to load only")
        finally:
            self._socket.close(0)
            self._transport.close()
            self._context.term()

    def _send(self, frames: list[bytes]) -> None:
        assert self._socket is not None
        try:
            self._socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass  # PUB drops for slow subscribers itself; never wait for them
        except zmq.ZMQError as exc:
            log.warning("could not publish an event batch: %s", exc)

    # ----- snapshots (request workers) -----
    def snapshot(self, tiers: Sequence[str], *, with_keys: bool = True) -> SnapshotReply:
        """The keys of ``tiers``, as of the batch numbered ``seq`` in the reply.

        The buffer is flushed first, so every change before the snapshot is in a batch up
        to ``seq``; changes while the keys are read may appear in both (applying an event
        twice is harmless: stored and evicted are idempotent).
        """
        with self._mutex:
            self._flush_locked(None)
            seq = self._seq
        self._wake.set()
        wanted = (list(tiers) or list(ev.TIERS)) if with_keys else []
        digests: dict[str, bytes] = {}
        truncated: list[str] = []
        for tier in wanted:
            source = self._l1_keys if tier == "l1" else self._l2_keys
            keys: list[Any] = source() if source is not None else []
            if len(keys) > self.snapshot_max_keys:
                keys = keys[-self.snapshot_max_keys :]  # disk: most recently used last
                truncated.append(tier)
            digests[tier] = b"".join(bytes(k[: ev.DIGEST_BYTES]) for k in keys)
            self.metrics.snapshots.labels(tier=tier).inc()
        return SnapshotReply(
            epoch=self.epoch,
            seq=seq,
            events_port=self.port,
            chunk_size=self.chunk_size,
            tiers=digests,
            truncated=truncated,
            namespaces=self.namespaces(),
        )
