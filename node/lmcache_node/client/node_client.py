"""``NodeClient``: handshake, registration, lookup/store/retrieve, reconnect.

Thread-safe. Every call has a timeout. After the connection drops, calls fail fast with
``NodeUnavailableError`` while a background thread re-establishes the session with
backoff (handshake, then re-registration of every KV cache under the same
``Registration`` objects), so a server restart needs no restart of vLLM.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from lmcache_node import __version__
from lmcache_node.client.connection import Connection
from lmcache_node.client.data_path import DataPathCalls
from lmcache_node.client.errors import (
    IncompatibleServerError,
    NodeAuthenticationError,
    NodeClientError,
    NodeTimeoutError,
    NodeUnavailableError,
    RemoteError,
)
from lmcache_node.client.registrations import Registration, RegistrationCalls
from lmcache_node.keys import HASH_ALGORITHM
from lmcache_node.protocol import messages as m
from lmcache_node.protocol.codec import decode_payload
from lmcache_node.protocol.credentials import ClientCredentials
from lmcache_node.retry import RetryPolicy
from lmcache_node.transfer import shm

log = logging.getLogger(__name__)

T = TypeVar("T", bound=msgspec.Struct)
# After a disconnect: try at once, then back off to 2 s between tries until the server is back.
RECONNECT = RetryPolicy.forever(base_s=0.05, cap_s=2.0)
_INCOMPATIBLE = {m.ErrorCode.INCOMPATIBLE.value, m.ErrorCode.BAD_VERSION.value}


@dataclass(frozen=True)
class HandshakeInfo:
    server_version: str
    protocol_version: int
    chunk_size: int
    hash_algorithm: str
    transfer_modes: tuple[str, ...]
    device: str
    heartbeat_timeout_s: float
    shm_dir: str = ""  # the server's shm directory (segments are created there)
    limits: dict[str, float] = field(default_factory=dict)

    def limit(self, name: str) -> float | None:
        return self.limits.get(name)


class NodeClient(RegistrationCalls, DataPathCalls):
    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 5.0,
        expected_chunk_size: int | None = None,
        heartbeat_interval_s: float | None = None,
        reconnect: RetryPolicy | None = None,
        async_workers: int = 4,
        credentials: ClientCredentials | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.expected_chunk_size = expected_chunk_size
        self.info: HandshakeInfo | None = None
        self._heartbeat_interval = heartbeat_interval_s
        self._reconnect = reconnect or RECONNECT
        self._registrations: list[Registration] = []
        self._shm_dir: shm.ShmDirectory | None = None  # attached on first use
        self._mutex = threading.Lock()
        self._available = threading.Event()
        self._closed = threading.Event()
        self._recovering = threading.Lock()
        self._recover_wanted = threading.Event()
        self._last_call = time.monotonic()
        self._executor = ThreadPoolExecutor(async_workers, thread_name_prefix="lmcache-node-client")
        self._conn = Connection(
            endpoint,
            on_disconnect=self._lost,
            on_connect=self._recover_wanted.set,
            credentials=credentials,
        )
        self._background = threading.Thread(
            target=self._background_loop, name="lmcache-node-client-keepalive", daemon=True
        )
        # A process that exits without close() still removes its shm segment names.
        atexit.register(_remove_names_at_exit, weakref.ref(self))

    # ----- connection -----
    def connect(self) -> HandshakeInfo:
        """Handshake (waiting up to ``timeout_s`` for the server to come up)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                info = self._handshake(max(0.05, deadline - time.monotonic()))
                break
            except NodeAuthenticationError:
                raise
            except (NodeUnavailableError, NodeTimeoutError):
                if self._conn.auth_failure is not None:
                    raise NodeAuthenticationError(self._conn.auth_failure) from None
                if time.monotonic() >= deadline:
                    raise NodeUnavailableError(
                        f"cannot reach the cache server at {self.endpoint} within "
                        f"{self.timeout_s:.1f} s: is it running (lmcache-node serve)?"
                    ) from None
                time.sleep(0.02)
        self._available.set()
        if not self._background.is_alive():
            self._background.start()
        return info

    def _handshake(self, timeout: float) -> HandshakeInfo:
        request = m.HandshakeRequest(
            client_version=__version__,
            chunk_size=self.expected_chunk_size or 0,
            pid=os.getpid(),
            hostname=socket.gethostname(),
        )
        reply = self._call(
            m.Op.HANDSHAKE, request, m.HandshakeReply, timeout=timeout, internal=True
        )
        if reply.hash_algorithm != HASH_ALGORITHM:
            raise IncompatibleServerError(
                m.ErrorCode.INCOMPATIBLE.value,
                f"the cache server at {self.endpoint} keys chunks with "
                f"{reply.hash_algorithm!r}, this client with {HASH_ALGORITHM!r}: run the same "
                f"lmcache-k8s version on both sides (server {reply.server_version}, client "
                f"{__version__})",
            )
        info = HandshakeInfo(
            server_version=reply.server_version,
            protocol_version=reply.protocol_version,
            chunk_size=reply.chunk_size,
            hash_algorithm=reply.hash_algorithm,
            transfer_modes=tuple(reply.transfer_modes),
            device=reply.device,
            heartbeat_timeout_s=reply.heartbeat_timeout_s,
            shm_dir=reply.shm_dir,
            limits=dict(reply.limits),
        )
        self.info = info
        return info

    def _shm_directory(self) -> shm.ShmDirectory:
        """The shm directory the server named in the handshake (attached once per path)."""
        path = self.info.shm_dir if self.info is not None else ""
        if not path:
            raise shm.SharedMemoryError(
                f"the cache server at {self.endpoint} named no shm directory; upgrade it"
            )
        with self._mutex:
            if self._shm_dir is None or str(self._shm_dir.path) != path:
                self._shm_dir = shm.ShmDirectory.attach(path)
            return self._shm_dir

    @property
    def available(self) -> bool:
        return self._available.is_set()

    def _lost(self) -> None:
        if self._available.is_set():
            self._available.clear()
            self._recover_wanted.set()

    def _background_loop(self) -> None:
        """Keep the session alive (pings when idle) and restore it after a disconnect."""
        failures = 0
        while not self._closed.is_set():
            interval = self._heartbeat_interval or (
                self.info.heartbeat_timeout_s / 3 if self.info else 5.0
            )
            wanted = self._recover_wanted.wait(
                self._reconnect.delay(failures) if not self.available else min(interval, 1.0)
            )
            if self._closed.is_set():
                return
            if wanted or not self.available:
                self._recover_wanted.clear()
                failures = 0 if self._recover() else failures + 1
                continue
            if time.monotonic() - self._last_call >= interval:
                try:
                    self._call(m.Op.PING, m.PingRequest(), m.PingReply, internal=True)
                except RemoteError as exc:
                    if exc.code == m.ErrorCode.NO_SESSION.value:
                        self._lost()
                except NodeClientError as exc:
                    log.warning("heartbeat to %s failed: %s", self.endpoint, exc)
                    self._lost()

    def _recover(self, *, force: bool = False) -> bool:
        """Ping; on a lost session, handshake and re-register. True when usable again.

        Waits at most ``timeout_s`` for a recovery already running in another thread.
        """
        if not self._recovering.acquire(timeout=self.timeout_s):
            return self._available.is_set()
        try:
            if self._available.is_set() and not force:
                return True  # another thread restored it meanwhile
            try:
                try:
                    self._call(m.Op.PING, m.PingRequest(), m.PingReply, internal=True)
                except RemoteError as exc:
                    if exc.code != m.ErrorCode.NO_SESSION.value:
                        raise
                    self._reestablish()
                self._available.set()
                return True
            except IncompatibleServerError as exc:
                log.error("the restarted cache server is incompatible: %s", exc)
                return False
            except NodeClientError as exc:
                log.debug("reconnect to %s not possible yet: %s", self.endpoint, exc)
                return False
        finally:
            self._recovering.release()

    def _reestablish(self) -> None:
        self._handshake(self.timeout_s)
        with self._mutex:
            registrations = list(self._registrations)
        for registration in registrations:
            self._send_registration(registration)
        log.info(
            "reconnected to the cache server at %s and re-registered %d KV cache(s)",
            self.endpoint, len(registrations),
        )  # fmt: skip

    # ----- calls -----
    def _call(
        self,
        op: m.Op,
        payload: msgspec.Struct,
        reply_type: type[T],
        *,
        timeout: float | None = None,
        internal: bool = False,
        retry_session: bool = True,
    ) -> T:
        if self._closed.is_set():
            raise NodeClientError("the client is closed")
        if not internal and not self._available.is_set():
            if self.info is None:
                raise NodeUnavailableError("call connect() first")
            # Try to restore the session now: instant failure when there is no connection,
            # at most timeout_s when the server is connected but silent.
            if not self._recover():
                raise NodeUnavailableError(
                    f"the cache server at {self.endpoint} is unavailable; reconnecting in the "
                    "background"
                )
        wait = self.timeout_s if timeout is None else timeout
        request_id, future = self._conn.submit(op, payload)
        self._last_call = time.monotonic()
        try:
            header, body = future.result(timeout=wait)
        except TimeoutError:
            self._conn.forget(request_id)
            if not internal:
                self._lost()
            raise NodeTimeoutError(
                f"{op.name.lower()} got no answer from {self.endpoint} within {wait:.1f} s"
            ) from None
        if header.status != m.Status.OK:
            error = decode_payload(body, m.ErrorReply)
            if error.code in _INCOMPATIBLE:
                raise IncompatibleServerError(error.code, error.message)
            if error.code == m.ErrorCode.NO_SESSION.value and not internal and retry_session:
                self._available.clear()
                if not self._recover():
                    raise NodeUnavailableError(
                        f"the cache server at {self.endpoint} lost this client's session and "
                        "it could not be restored yet"
                    )
                return self._call(op, payload, reply_type, timeout=timeout, retry_session=False)
            raise RemoteError(error.code, error.message)
        return decode_payload(body, reply_type)

    # ----- admin -----
    def free_lock(self, lock_ids: int | list[int]) -> int:
        ids = [lock_ids] if isinstance(lock_ids, int) else list(lock_ids)
        return self._call(m.Op.FREE_LOCK, m.FreeLockRequest(lock_ids=ids), m.FreeLockReply).freed

    def end_session(self) -> tuple[int, int]:
        """Release this client's locks and registrations on the server."""
        reply = self._call(m.Op.END_SESSION, m.EndSessionRequest(), m.EndSessionReply)
        with self._mutex:
            registrations, self._registrations = self._registrations, []
        for registration in registrations:
            registration.exported.unlink()
        return reply.locks_released, reply.registrations_removed

    def ping(self) -> float:
        """Round-trip time in seconds."""
        start = time.perf_counter()
        self._call(m.Op.PING, m.PingRequest(), m.PingReply)
        return time.perf_counter() - start

    def stats(self) -> dict[str, Any]:
        return self._call(m.Op.STATS, m.StatsRequest(), m.StatsReply).stats

    def clear(self) -> int:
        return self._call(m.Op.CLEAR, m.ClearRequest(), m.ClearReply).cleared

    def close(self) -> None:
        """End the session (best effort, 1 s), stop the threads and remove our shm names."""
        if self._closed.is_set():
            return
        if self._available.is_set():
            try:
                self._call(m.Op.END_SESSION, m.EndSessionRequest(), m.EndSessionReply, timeout=1.0)
            except NodeClientError as exc:
                log.debug("end of session on close failed: %s", exc)
        self._closed.set()
        self._recover_wanted.set()
        self._conn.close()
        self._executor.shutdown(wait=False)
        with self._mutex:
            registrations, self._registrations = self._registrations, []
        for registration in registrations:
            registration.exported.unlink()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_names_at_exit(ref: weakref.ref[NodeClient]) -> None:
    client = ref()
    if client is None:
        return
    with client._mutex:
        registrations = list(client._registrations)
    for registration in registrations:
        registration.exported.unlink()
