"""The node server: a ZMQ ROUTER owned by one I/O thread, a pool of request workers.

The I/O thread is the only one that touches the socket. It hands each request, with the
CURVE identity (ZAP ``User-Id``) of the connection it came on, to the worker pool and
sends the replies workers queue (a pipe wakes it). Every request gets one reply: handlers
turn failures into typed errors, a request that arrives during shutdown is answered
``shutting_down`` and one that finds the queue full ``busy``. Off loopback the socket is
CURVE-encrypted and only allowed client keys get in (``transport.py``). A reaper drops
sessions that stopped sending (heartbeat timeout) with their registrations, shared memory
and locks. ``stop()``
stops accepting, lets in-flight requests finish (bounded by ``blocking_timeout_secs``),
releases the shared memory and returns.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import queue
import threading
import time
from typing import Any

import torch
import zmq
from prometheus_client import CollectorRegistry

from lmcache_node import __version__
from lmcache_node.config import NodeConfig
from lmcache_node.devices import resolve_device
from lmcache_node.engine.core import CacheEngine
from lmcache_node.metrics import NodeMetrics
from lmcache_node.protocol import messages as m
from lmcache_node.protocol.codec import FrameError, decode_header, encode_reply
from lmcache_node.server.events import EventPublisher
from lmcache_node.server.handlers import RequestHandler
from lmcache_node.server.state import SessionTable
from lmcache_node.server.transport import Transport
from lmcache_node.transfer import shm

log = logging.getLogger(__name__)

_BATCH = 256  # requests read per poll wake-up
_SWEEP_PERIOD_S = 60.0  # how often leaked shm segments of dead processes are removed
_HEARTBEAT_IVL_MS = 5000  # ZMTP pings find dead connections, so a reconnecting client's
_HEARTBEAT_TIMEOUT_MS = 15000  # routing id is free again soon (no handover of live ids)


def make_engine(config: NodeConfig) -> CacheEngine:
    """The engine the server runs on (the lead's factory; tiers attach there)."""
    from lmcache_node.engine import build_engine  # noqa: PLC0415 - late: tiers may import us

    return build_engine(config)


class _Waker:
    """A pipe that wakes the I/O thread's poller from any thread."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        for fd in (self.read_fd, self.write_fd):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the reader is awake already
        except OSError:
            pass  # closed: the I/O thread has exited

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class NodeServer:
    def __init__(
        self,
        config: NodeConfig,
        *,
        engine: CacheEngine | None = None,
        registry: CollectorRegistry | None = None,
        transport: Transport | None = None,
    ) -> None:
        choice = resolve_device(config.device)  # DeviceUnavailableError: a GPU that cannot work
        if choice.device != config.device or choice.reason != "configured":
            log.info("serving device %s (%s)", choice.device, choice.reason)
        self.config = config.model_copy(update={"device": choice.device})
        config = self.config
        self._engine = engine
        self.metrics = NodeMetrics(registry)
        self.sessions = SessionTable()
        self._handler: RequestHandler | None = None
        self._shm_dir: shm.ShmDirectory | None = None
        self.endpoint = f"tcp://{config.host}:{config.port}"
        # raises TransportSecurityError when credentials are missing or unreadable
        self.transport = transport or Transport.from_config(config)
        # A context of our own: the ZAP handler is per context (one server, one handler).
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._work: queue.SimpleQueue[tuple[bytes, str, list[bytes]] | None] = queue.SimpleQueue()
        self._replies: collections.deque[list[bytes]] = collections.deque()
        self._waker = _Waker()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._bound = threading.Event()
        self._engine_ready = threading.Event()
        self._bind_error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._inflight = 0
        self.events: EventPublisher | None = None  # the events socket (events_port)

    # ----- lifecycle -----
    @property
    def engine(self) -> CacheEngine:
        if self._engine is None:
            raise RuntimeError("the engine is not built yet")
        return self._engine

    @property
    def handler(self) -> RequestHandler:
        if self._handler is None:
            raise RuntimeError("the server is not started yet")
        return self._handler

    @property
    def ready(self) -> bool:
        return self._engine_ready.is_set() and not self._stopping.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        """Bind, build the engine, start the threads; raises when the port cannot be bound.

        The port is bound first so a busy port fails at once, before a large L1 pool is
        allocated; requests wait in the socket until the engine is ready.
        """
        # Each request's copies run on its worker thread: torch's intra-op threads only add
        # hand-offs to memcpy-sized copies (and stall on a busy core); workers give the
        # parallelism instead (--max-workers).
        torch.set_num_threads(1)
        # Before anything else: a directory we must not use stops the start (exit 1).
        self._shm_dir = shm.ShmDirectory.prepare(self.config.shm_dir, self.config.shm_group)
        io_thread = threading.Thread(target=self._io_loop, name="lmcache-node-io", daemon=True)
        io_thread.start()
        self._bound.wait()
        if self._bind_error is not None:
            raise self._bind_error
        self._threads.append(io_thread)
        try:
            if self._engine is None:
                self._engine = make_engine(self.config)
        except BaseException:
            self._stopping.set()
            self._engine_ready.set()
            raise
        self._shm_dir.sweep()
        self.metrics.attach_engine(self._engine, self.sessions.registration_count)
        self.metrics.info.info({"version": __version__, "device": self.config.device})
        self._handler = RequestHandler(
            self.config,
            self._engine,
            self.sessions,
            self.metrics,
            shm_dir=self._shm_dir,
            authenticated=self.transport.authenticated,
        )
        if self.config.events_port:
            self._start_events(self._engine)
        self._engine_ready.set()
        for index in range(self.config.max_workers):
            worker = threading.Thread(
                target=self._worker_loop, name=f"lmcache-node-worker-{index}", daemon=True
            )
            worker.start()
            self._threads.append(worker)
        reaper = threading.Thread(target=self._reaper_loop, name="lmcache-node-reaper", daemon=True)
        reaper.start()
        self._threads.append(reaper)
        log.info(
            "lmcache-node server listening on %s (%s; chunk size %d, %d worker(s), device %s)",
            self.endpoint, self.transport.describe(), self.config.chunk_size,
            self.config.max_workers, self.config.device,
        )  # fmt: skip

    def _start_events(self, engine: CacheEngine) -> None:
        config = self.config
        publisher = EventPublisher(
            host=config.host,
            port=config.events_port,
            transport=self.transport,
            sessions=self.sessions,
            registry=self.metrics.registry,
            flush_secs=config.events_flush_secs,
            max_pending_keys=config.events_max_pending_keys,
            snapshot_max_keys=config.events_snapshot_max_keys,
            chunk_size=config.chunk_size,
        )
        publisher.attach(engine)
        try:
            publisher.start()
        except OSError:
            self._stopping.set()
            self._engine_ready.set()
            raise
        self.events = publisher
        self.handler.events = publisher

    def request_stop(self) -> None:
        """Begin a graceful shutdown (safe from signal handlers and any thread)."""
        if not self._stopping.is_set():
            log.info("shutting down: no new requests, finishing in-flight ones")
            self._stopping.set()
            self._waker.wake()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def stop(self) -> None:
        self.request_stop()
        if not self._threads and self._bind_error is None:  # never started
            self._stopped.set()
        self._stopped.wait()

    # ----- threads -----
    def _io_loop(self) -> None:
        router = self._context.socket(zmq.ROUTER)
        try:
            router.setsockopt(zmq.LINGER, 1000)
            # No ROUTER_HANDOVER: a second connection can never take over a live routing id.
            router.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)  # bigger: cut
            router.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
            router.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
            self.transport.secure(self._context, router)
            router.bind(self.endpoint)
            if self.config.port == 0:
                self.endpoint = str(router.getsockopt_string(zmq.LAST_ENDPOINT))
        except zmq.ZMQError as exc:
            router.close(0)
            self.transport.close()
            self._context.term()
            self._bind_error = OSError(
                f"cannot bind the ZMQ server to {self.endpoint}: {exc}; is another server "
                "running on this port? pick another with --port"
            )
            self._bound.set()
            self._stopped.set()
            return
        self._bound.set()
        self._engine_ready.wait()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._waker.read_fd, zmq.POLLIN)
        deadline: float | None = None
        try:
            while True:
                events = dict(poller.poll(200))
                if events.get(router):
                    self._receive(router)
                if events.get(self._waker.read_fd):
                    self._waker.drain()
                self._send_replies(router)
                if self._stopping.is_set():
                    if deadline is None:
                        deadline = time.monotonic() + self.config.blocking_timeout_secs
                    if self._inflight == 0:
                        break
                    if time.monotonic() > deadline:
                        log.error("gave up waiting for %d in-flight request(s)", self._inflight)
                        break
        except Exception:  # the socket thread must never die silently
            log.exception("the ZMQ I/O thread failed; stopping the server")
            self._stopping.set()
        finally:
            router.close(linger=1000)
            self.transport.close()
            self._context.term()
            self._shutdown_workers()

    def _receive(self, router: zmq.Socket[bytes]) -> None:
        limit = self.config.max_queued_requests + self.config.max_workers
        for _ in range(_BATCH):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            routing_id = frames[0].bytes
            body = [frame.bytes for frame in frames[1:]]
            if self._stopping.is_set():
                router.send_multipart([routing_id, *_refusal(body, _SHUTTING_DOWN)])
                continue
            if self._inflight >= limit:
                self.metrics.observe("busy", m.ErrorCode.BUSY.value, 0.0)
                router.send_multipart([routing_id, *_refusal(body, _BUSY)])
                continue
            identity = self.transport.identity(frames[-1])
            self._inflight += 1
            self._work.put((routing_id, identity, body))

    def _send_replies(self, router: zmq.Socket[bytes]) -> None:
        while self._replies:
            frames = self._replies.popleft()
            self._inflight -= 1
            try:
                router.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                log.warning("dropped a reply to %s: its send queue is full", frames[0].hex())
            except zmq.ZMQError as exc:
                log.warning("could not send a reply to %s: %s", frames[0].hex(), exc)

    def _worker_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            routing_id, identity, body = item
            try:
                reply = self.handler.handle(routing_id, body, identity=identity)
            except BaseException:  # handle() answers every failure; this is a last resort
                log.exception("request worker failed; answering with an internal error")
                reply = encode_reply(
                    m.Header(m.MAGIC, m.PROTOCOL_VERSION, 0, 0),
                    m.ErrorReply(code=m.ErrorCode.INTERNAL.value, message="internal error"),
                )
            self._replies.append([routing_id, *reply])
            self._waker.wake()

    def _reaper_loop(self) -> None:
        timeout = self.config.heartbeat_timeout_secs
        period = min(1.0, timeout / 4)
        next_sweep = time.monotonic() + _SWEEP_PERIOD_S
        while not self._stopping.wait(period):
            try:
                self.reap(timeout)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + _SWEEP_PERIOD_S
                    self.handler.shm_dir.sweep()
            except Exception:
                log.exception("session reaper failed; retrying")

    def reap(self, timeout: float) -> int:
        """Drop sessions silent for ``timeout`` seconds; returns how many."""
        expired = self.sessions.expired(timeout)
        for session in expired:
            log.warning(
                "client %s (pid %d) sent nothing for %.0f s: dropping its registrations, "
                "shared memory and locks", session.session_id, session.pid, timeout,
            )  # fmt: skip
            self.handler.drop_session(session, reason="heartbeat_timeout", unlink=True)
        self.engine.expire_locks()
        return len(expired)

    def _shutdown_workers(self) -> None:
        for _ in range(self.config.max_workers):
            self._work.put(None)
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current and thread.name.startswith("lmcache-node-worker"):
                thread.join(timeout=self.config.blocking_timeout_secs)
        if self._handler is not None:
            for session in self.sessions.sessions():
                self._handler.drop_session(session, reason="shutdown", unlink=False)
            if self.events is not None:
                self.events.close()
            self.engine.close()  # finish queued write-downs (bounded), release the disk lock
        self._waker.close()
        log.info("server stopped")
        self._stopped.set()

    def stats(self) -> dict[str, Any]:
        return self.handler.snapshot()


_SHUTTING_DOWN = m.ErrorReply(
    code=m.ErrorCode.SHUTTING_DOWN.value,
    message="the server is shutting down; retry after it restarts",
)
_BUSY = m.ErrorReply(
    code=m.ErrorCode.BUSY.value,
    message="the server's request queue is full (max_queued_requests): back off and retry",
)


def _refusal(body: list[bytes], error: m.ErrorReply) -> list[bytes]:
    """``error`` echoing the request's op and id when its header decodes."""
    header = m.Header(m.MAGIC, m.PROTOCOL_VERSION, 0, 0)
    try:
        if body:
            header = decode_header(body[0])
    except FrameError:
        pass
    return encode_reply(header, error)
