"""Request handlers: one reply per request, the result or a typed error.

``RequestHandler.handle`` never raises: a malformed frame, an unknown op, a payload of the
wrong type, an unknown session or registration, out-of-range blocks and bugs all become
an ``ErrorReply`` (bugs are logged with their traceback). Sessions belong to the client
identity that opened them (the CURVE key; "" on an unauthenticated loopback server):
another identity's registrations and locks are ``forbidden``, and every size, count and
time a client sends is checked against the server's ``max_*`` bounds (``limit_exceeded``)
before anything is mapped, allocated or iterated. Byte copies go through
``KVGeometry.chunk_views`` and ``PageSpan.write``/``read_into``: the same code for CPU
shared memory and CUDA IPC tensors.

The ops live in two mixins beside this module: ``registration_ops.py`` (register,
unregister, their bounds) and ``data_ops.py`` (lookup, store, retrieve); here are the entry
point, the handshake, the admin ops and session cleanup.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import msgspec

from lmcache_node import __version__
from lmcache_node.config import NodeConfig
from lmcache_node.engine.core import CacheEngine
from lmcache_node.engine.types import ForeignLockError
from lmcache_node.keys import HASH_ALGORITHM
from lmcache_node.metrics import NodeMetrics
from lmcache_node.protocol import messages as m
from lmcache_node.protocol.codec import (
    FrameError,
    decode_header,
    decode_payload,
    encode_reply,
    op_of,
)
from lmcache_node.protocol.events import TIERS
from lmcache_node.server.data_ops import DataOps
from lmcache_node.server.errors import RequestError
from lmcache_node.server.events import EventPublisher
from lmcache_node.server.registration_ops import RegistrationOps
from lmcache_node.server.state import IdentityMismatch, Session, SessionTable
from lmcache_node.transfer import shm

log = logging.getLogger(__name__)

_ERROR_HEADER = m.Header(m.MAGIC, m.PROTOCOL_VERSION, 0, 0)


class RequestHandler(RegistrationOps, DataOps):
    def __init__(
        self,
        config: NodeConfig,
        engine: CacheEngine,
        sessions: SessionTable,
        metrics: NodeMetrics,
        *,
        shm_dir: shm.ShmDirectory,
        is_stopping: Callable[[], bool] = lambda: False,
        authenticated: bool = False,
    ) -> None:
        self.config = config
        self.shm_dir = shm_dir
        self.engine = engine
        self.sessions = sessions
        self.metrics = metrics
        self.is_stopping = is_stopping
        self.authenticated = authenticated
        self.hash_algorithm = HASH_ALGORITHM  # named in the handshake; clients check it
        self._ops: dict[m.Op, Callable[[Session | None, bytes, Any], msgspec.Struct]] = {
            m.Op.REGISTER: self._register,
            m.Op.UNREGISTER: self._unregister,
            m.Op.LOOKUP: self._lookup,
            m.Op.STORE: self._store,
            m.Op.RETRIEVE: self._retrieve,
            m.Op.FREE_LOCK: self._free_lock,
            m.Op.END_SESSION: self._end_session,
            m.Op.CLEAR: self._clear,
            m.Op.PING: self._ping,
            m.Op.STATS: self._stats,
            m.Op.SNAPSHOT: self._snapshot,
        }
        self.events: EventPublisher | None = None  # set by the server when events are on

    # ----- entry point -----
    def handle(self, routing_id: bytes, frames: list[bytes], *, identity: str = "") -> list[bytes]:
        start = time.perf_counter()
        header = _ERROR_HEADER
        op_name = "invalid"
        try:
            if len(frames) != 2:
                raise FrameError(
                    m.ErrorCode.BAD_FRAME,
                    f"a request has 2 frames (header, payload), got {len(frames)}",
                )
            header = decode_header(frames[0])
            op = op_of(header)
            op_name = op.name.lower()
            if self.is_stopping():
                raise RequestError(
                    m.ErrorCode.SHUTTING_DOWN, "the server is shutting down; retry after restart"
                )
            payload = decode_payload(frames[1], m.REQUEST_TYPES[op])
            if self.authenticated and not identity:
                raise RequestError(
                    m.ErrorCode.FORBIDDEN, "the connection carries no authenticated identity"
                )
            try:
                session = self.sessions.touch(routing_id, identity)
            except IdentityMismatch as exc:
                raise RequestError(m.ErrorCode.FORBIDDEN, str(exc)) from None
            if session is None and op is not m.Op.HANDSHAKE:
                raise RequestError(
                    m.ErrorCode.NO_SESSION,
                    "no session for this client: send a handshake first (the server may "
                    "have restarted)",
                )
            reply: msgspec.Struct
            if isinstance(payload, m.HandshakeRequest):
                reply = self._handshake(session, routing_id, payload, identity)
            else:
                reply = self._ops[op](session, routing_id, payload)
            outcome = "ok"
        except (FrameError, RequestError) as exc:
            log.warning(
                "%s request from %s failed: %s: %s",
                op_name,
                routing_id.hex(),
                exc.code.value,
                exc.message,
            )
            reply = m.ErrorReply(code=exc.code.value, message=exc.message)
            outcome = exc.code.value
        except Exception as exc:  # a bug: answer, log the traceback, keep the worker alive
            log.exception("%s request from %s failed unexpectedly", op_name, routing_id.hex())
            reply = m.ErrorReply(
                code=m.ErrorCode.INTERNAL.value,
                message=f"internal server error ({type(exc).__name__}: {exc}); see the server log",
            )
            outcome = m.ErrorCode.INTERNAL.value
        self.metrics.observe(op_name, outcome, time.perf_counter() - start)
        return encode_reply(header, reply)

    # ----- ops -----
    def _handshake(
        self, session: Session | None, routing_id: bytes, req: m.HandshakeRequest, identity: str
    ) -> m.HandshakeReply:
        if req.protocol_version != m.PROTOCOL_VERSION:
            raise RequestError(
                m.ErrorCode.INCOMPATIBLE,
                f"client protocol {req.protocol_version} != server protocol {m.PROTOCOL_VERSION}",
            )
        if req.chunk_size and req.chunk_size != self.config.chunk_size:
            raise RequestError(
                m.ErrorCode.INCOMPATIBLE,
                f"client chunk size {req.chunk_size} != server chunk size "
                f"{self.config.chunk_size}: start both with the same --chunk-size",
            )
        if len(req.client_version) > 64 or len(req.hostname) > 255:
            raise RequestError(
                m.ErrorCode.LIMIT_EXCEEDED, "client_version or hostname is too long (64 / 255)"
            )
        if session is None and self.sessions.count() >= self.config.max_sessions:
            raise RequestError(
                m.ErrorCode.LIMIT_EXCEEDED,
                f"the server has {self.config.max_sessions} client sessions, its limit "
                "(max_sessions): end idle sessions or raise the limit",
            )
        try:
            new, old = self.sessions.open(routing_id, req.pid, req.hostname, identity)
        except IdentityMismatch as exc:
            raise RequestError(m.ErrorCode.FORBIDDEN, str(exc)) from None
        if old is not None:
            log.info(
                "client %s (pid %d) handshook again: dropping its old session",
                new.session_id,
                req.pid,
            )
            self.drop_session(old, reason="replaced", unlink=False)
        log.info(
            "client %s connected (pid %d on %s, version %s)",
            new.session_id,
            req.pid,
            req.hostname or "?",
            req.client_version,
        )
        return m.HandshakeReply(
            server_version=__version__,
            protocol_version=m.PROTOCOL_VERSION,
            chunk_size=self.config.chunk_size,
            hash_algorithm=self.hash_algorithm,
            transfer_modes=list(m.TRANSFER_MODES),
            device=self.config.device,
            heartbeat_timeout_s=self.config.heartbeat_timeout_secs,
            shm_dir=str(self.shm_dir.path),
            limits=self._limits(),
        )

    def _limits(self) -> dict[str, float]:
        c = self.config
        return {
            "max_lock_ttl_secs": c.max_lock_ttl_secs,
            "max_locks_per_session": c.max_locks_per_session,
            "max_keys_per_request": c.max_keys_per_request,
            "max_registrations_per_session": c.max_registrations_per_session,
            "max_layers_per_registration": c.max_layers_per_registration,
            "max_segments_per_registration": c.max_segments_per_registration,
            "max_staging_chunks_per_session": c.max_staging_chunks_per_session,
        }

    def _free_lock(
        self, session: Session | None, routing_id: bytes, req: m.FreeLockRequest
    ) -> m.FreeLockReply:
        assert session is not None
        if len(req.lock_ids) > self.config.max_locks_per_session:
            raise RequestError(
                m.ErrorCode.LIMIT_EXCEEDED,
                f"{len(req.lock_ids)} lock ids in one request; a session holds at most "
                f"{self.config.max_locks_per_session} (max_locks_per_session)",
            )
        try:
            return m.FreeLockReply(freed=self.engine.unlock_owned(req.lock_ids, session.session_id))
        except ForeignLockError as exc:
            raise RequestError(m.ErrorCode.FORBIDDEN, str(exc)) from None

    def _end_session(
        self, session: Session | None, routing_id: bytes, req: m.EndSessionRequest
    ) -> m.EndSessionReply:
        assert session is not None
        count = len(session.registrations)
        locks = self.engine.unlock_owner(session.session_id)
        for reg_id in list(session.registrations):
            registration = self.sessions.remove_registration(session, reg_id)
            if registration is not None:
                self._release(registration, unlink=False)
        self.sessions.close(session)  # frees its slot (max_sessions) at once
        log.info(
            "client %s ended its session: %d lock(s), %d registration(s) released",
            session.session_id,
            locks,
            count,
        )
        return m.EndSessionReply(locks_released=locks, registrations_removed=count)

    def _clear(
        self, session: Session | None, routing_id: bytes, req: m.ClearRequest
    ) -> m.ClearReply:
        if self.authenticated:
            raise RequestError(
                m.ErrorCode.FORBIDDEN,
                "clearing the cache is an admin operation: use POST /cache/clear on the HTTP "
                "API with its bearer token (vLLM workers' credentials cannot clear)",
            )
        cleared = self.engine.clear()
        log.info("cleared %d chunk(s) on request of client %s", cleared, routing_id.hex())
        return m.ClearReply(cleared=cleared)

    def _ping(self, session: Session | None, routing_id: bytes, req: m.PingRequest) -> m.PingReply:
        return m.PingReply(server_time=time.time())

    def _stats(
        self, session: Session | None, routing_id: bytes, req: m.StatsRequest
    ) -> m.StatsReply:
        return m.StatsReply(stats=self.snapshot())

    def _snapshot(
        self, session: Session | None, routing_id: bytes, req: m.SnapshotRequest
    ) -> m.SnapshotReply:
        if self.events is None:
            raise RequestError(
                m.ErrorCode.INCOMPATIBLE,
                "this server publishes no events (events_port is 0): start it with "
                "--events-port PORT to serve cache-aware routers",
            )
        unknown = [t for t in req.tiers if t not in TIERS]
        if unknown or len(req.tiers) > len(TIERS):
            raise RequestError(
                m.ErrorCode.BAD_REQUEST,
                f"unknown or repeated tier(s) {unknown or req.tiers}; the tiers are "
                f"{', '.join(TIERS)} (an empty list asks for all)",
            )
        return self.events.snapshot(list(dict.fromkeys(req.tiers)), with_keys=req.with_keys)

    # ----- shared with the server -----
    def snapshot(self) -> dict[str, Any]:
        """Aggregate counts only: served on the open /stats and to every client's STATS, so
        never session, routing or registration ids, pids, hostnames of clients or keys."""
        stats = vars(self.engine.stats()).copy()
        registrations = self.sessions.registrations()
        by_device: dict[str, int] = {}
        by_mode: dict[str, int] = {}
        for registration in registrations:
            by_device[registration.device] = by_device.get(registration.device, 0) + 1
            by_mode[registration.transfer_mode] = by_mode.get(registration.transfer_mode, 0) + 1
        return {
            "server_version": __version__,
            "host": socket.gethostname(),
            "chunk_size": self.config.chunk_size,
            "device": self.config.device,
            "tiers": {"l1": stats, **self.engine.tier_stats()},
            "sessions": len(self.sessions.sessions()),
            "registered_workers": len(registrations),
            "registrations": {
                "by_device": by_device,
                "by_transfer_mode": by_mode,
                "layers": sum(len(r.geometry.layers) for r in registrations),
            },
            "active_locks": stats["active_locks"],
        }

    def drop_session(self, session: Session, *, reason: str, unlink: bool) -> None:
        """Release everything a session holds: locks, registrations (and, for a dead
        worker, its shared memory names)."""
        self.sessions.close(session)
        locks = self.engine.unlock_owner(session.session_id)
        for registration in list(session.registrations.values()):
            self._release(registration, unlink=unlink)
            log.info(
                "Unregistered KV cache of worker %d (client %s): %d layers (%s)",
                registration.worker_id,
                session.session_id,
                len(registration.geometry.layers),
                reason,
            )
        session.registrations.clear()
        self.metrics.sessions_dropped.labels(reason=reason).inc()
        log.info(
            "dropped session of client %s (pid %d, %s): %d lock(s) released",
            session.session_id,
            session.pid,
            reason,
            locks,
        )
