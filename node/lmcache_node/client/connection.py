"""The client's socket thread: one DEALER, requests matched to replies by request id.

Callers never touch the socket: they queue frames and wait on a Future. A socket
monitor reports disconnects (pending calls then fail at once with
``NodeUnavailableError``) and reconnects (the owner re-establishes its session).
``ZMQ_IMMEDIATE`` makes a send with no live connection fail instead of queueing, so no
request is ever delivered late to a restarted server.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import itertools
import logging
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from lmcache_node.client.errors import NodeAuthenticationError, NodeUnavailableError
from lmcache_node.protocol import messages as m
from lmcache_node.protocol.codec import FrameError, decode_header, encode_request
from lmcache_node.protocol.credentials import ClientCredentials

log = logging.getLogger(__name__)

Reply = tuple[m.Header, bytes]
_AUTH_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class Connection:
    def __init__(
        self,
        endpoint: str,
        *,
        on_disconnect: Callable[[], None],
        on_connect: Callable[[], None],
        credentials: ClientCredentials | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._credentials = credentials
        self.auth_failure: str | None = None  # why the server refused us, until it accepts
        self.routing_id = uuid.uuid4().bytes
        self._on_disconnect = on_disconnect
        self._on_connect = on_connect
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[Reply]] = {}
        self._mutex = threading.Lock()
        self._outgoing: collections.deque[tuple[int, list[bytes]]] = collections.deque()
        self._read_fd, self._write_fd = os.pipe()
        for fd in (self._read_fd, self._write_fd):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self._closing = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="lmcache-node-client-io", daemon=True
        )
        self._started = threading.Event()
        self._thread.start()
        self._started.wait()

    def submit(self, op: m.Op, payload: msgspec.Struct) -> tuple[int, Future[Reply]]:
        if self._closing.is_set():
            raise NodeUnavailableError("the client is closed")
        request_id = next(self._ids)
        future: Future[Reply] = Future()
        with self._mutex:
            self._pending[request_id] = future
        self._outgoing.append((request_id, encode_request(op, request_id, payload)))
        self._wake()
        return request_id, future

    def forget(self, request_id: int) -> None:
        with self._mutex:
            self._pending.pop(request_id, None)

    def close(self) -> None:
        if not self._closing.is_set():
            self._closing.set()
            self._wake()
            self._thread.join(timeout=5)
            os.close(self._read_fd)
            os.close(self._write_fd)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (reader awake) or closed
            os.write(self._write_fd, b"\0")

    def _fail_pending(self, message: str) -> None:
        with self._mutex:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(NodeUnavailableError(message))

    def _run(self) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self._credentials is not None:
            self._credentials.apply(sock)
        monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | _AUTH_FAILURES
        )
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._read_fd, zmq.POLLIN)
        self._started.set()
        try:
            while not self._closing.is_set():
                events = dict(poller.poll(100))
                if events.get(self._read_fd):
                    try:
                        while os.read(self._read_fd, 4096):
                            pass
                    except BlockingIOError:
                        pass
                self._send_all(sock)
                if events.get(sock):
                    self._receive_all(sock)
                if events.get(monitor):
                    self._monitor_events(monitor)
        except Exception:
            log.exception("the client socket thread failed")
        finally:
            self._fail_pending("the client is closed")
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)

    def _send_all(self, sock: zmq.Socket[bytes]) -> None:
        while self._outgoing:
            request_id, frames = self._outgoing.popleft()
            with self._mutex:
                future = self._pending.get(request_id)
            if future is None or future.done():
                continue
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                self.forget(request_id)
                future.set_exception(
                    NodeUnavailableError(f"no connection to the cache server at {self.endpoint}")
                )

    def _receive_all(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                log.warning("ignored a reply of %d frames", len(frames))
                continue
            try:
                header = decode_header(frames[0])
            except FrameError as exc:
                log.warning("ignored a malformed reply: %s", exc.message)
                continue
            with self._mutex:
                future = self._pending.pop(header.request_id, None)
            if future is not None and not future.done():
                future.set_result((header, frames[1]))

    def _monitor_events(self, monitor: zmq.Socket[bytes]) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                log.warning("lost the connection to the cache server at %s", self.endpoint)
                self._fail_pending(f"the connection to {self.endpoint} was lost")
                self._on_disconnect()
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.auth_failure = None
                self._on_connect()
            elif event["event"] & _AUTH_FAILURES:
                self._refused(int(event["event"]), int(event["value"]))

    def _refused(self, event: int, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            reason = (
                f"the cache server at {self.endpoint} refused this client's CURVE key (ZAP "
                f"status {value}): the Secret mounted at LMCACHE_NODE_CREDENTIALS_DIR must hold "
                "a client key the server allows (after a key rotation, restart this pod)"
            )
        elif self._credentials is None:
            reason = (
                f"the security handshake with {self.endpoint} failed: the server requires "
                "CURVE credentials; set LMCACHE_NODE_CREDENTIALS_DIR to the directory of the "
                "cluster's client-credentials Secret"
            )
        else:
            reason = (
                f"the security handshake with {self.endpoint} failed (ZMQ event {event}, "
                f"value {value}): check that server.pub in LMCACHE_NODE_CREDENTIALS_DIR is this "
                "server's public key and that the server has CURVE enabled"
            )
        if reason != self.auth_failure:
            log.error("%s", reason)
        self.auth_failure = reason
        with self._mutex:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(NodeAuthenticationError(reason))
