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
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable
from typing import Any

import msgspec
import torch

from lmcache_node import __version__
from lmcache_node.config import NodeConfig
from lmcache_node.engine.core import CacheEngine, Pinned
from lmcache_node.engine.types import ForeignLockError, LockLimitError, StoreOutcome
from lmcache_node.keys import HASH_ALGORITHM, KEY_BYTES, ChunkKey
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
from lmcache_node.server.events import EventPublisher
from lmcache_node.server.state import IdentityMismatch, Registration, Session, SessionTable
from lmcache_node.transfer import cuda_ipc, shm
from lmcache_node.transfer.layout import KVGeometry, LayerGeometry, LayoutError

log = logging.getLogger(__name__)

_ERROR_HEADER = m.Header(m.MAGIC, m.PROTOCOL_VERSION, 0, 0)
_MAX_SEGMENT_BYTES = 1 << 48  # 256 TiB: above any real KV allocation, far below int64
_MAX_LAYOUT_CHARS = 256
_MAX_MODEL_NAME_CHARS = 1024
_MAX_KEY_SEED_BYTES = 64
_DEVICES = ("cpu", "cuda", "xpu")


class RequestError(Exception):
    def __init__(self, code: m.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RequestHandler:
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

    def _register(
        self, session: Session | None, routing_id: bytes, req: m.RegisterRequest
    ) -> m.RegisterReply:
        assert session is not None
        self._check_registration(session, req)
        if req.transfer_mode not in m.TRANSFER_MODES:
            raise RequestError(
                m.ErrorCode.BAD_REQUEST,
                f"transfer_mode {req.transfer_mode!r} is not one of {', '.join(m.TRANSFER_MODES)}",
            )
        if req.block_size <= 0 or self.config.chunk_size % req.block_size:
            raise RequestError(
                m.ErrorCode.INCOMPATIBLE,
                f"the chunk size {self.config.chunk_size} must be a multiple of the block size "
                f"{req.block_size}: pick a chunk size that is a multiple of vLLM's block size",
            )
        if not req.layers:
            raise RequestError(m.ErrorCode.BAD_REQUEST, "a registration needs at least one layer")
        blocks_per_chunk = self.config.chunk_size // req.block_size
        mapped: list[torch.Tensor] = []
        staging: torch.Tensor | None = None
        staging_name = ""
        event: object | None = None
        staging_fd = -1
        try:
            if req.transfer_mode == "shared":
                mapped = [self._map_segment(seg) for seg in req.segments]
                if req.event_handle and req.device == "cuda":
                    event = cuda_ipc.open_event(mapped[0].device.index or 0, req.event_handle)
            else:  # engine mode: geometry only, bytes come through a staging area
                mapped = [
                    torch.empty(seg.nbytes, dtype=torch.uint8, device="meta")
                    for seg in req.segments
                ]
            layers = []
            for index, layer in enumerate(req.layers):
                if not 0 <= layer.segment < len(mapped):
                    raise LayoutError(
                        f"layer {index} names segment {layer.segment} of {len(mapped)}"
                    )
                layers.append(
                    LayerGeometry.describe(
                        mapped[layer.segment],
                        dtype=layer.dtype,
                        shape=layer.shape,
                        stride=layer.stride,
                        storage_offset=layer.storage_offset,
                        block_dim=req.block_dim,
                    )
                )
            geometry = KVGeometry(tuple(layers), req.block_size, blocks_per_chunk)
            if req.transfer_mode == "engine":
                if not 1 <= req.staging_chunks <= 1024:
                    raise LayoutError(
                        f"staging_chunks must be in [1, 1024], got {req.staging_chunks}"
                    )
                self._check_staging(session, req.staging_chunks, geometry.chunk_bytes)
                segment = self.shm_dir.create("staging", geometry.chunk_bytes * req.staging_chunks)
                staging, staging_name, staging_fd = segment.tensor, segment.name, segment.lock_fd
        except (LayoutError, shm.SharedMemoryError, cuda_ipc.CudaIpcError) as exc:
            raise RequestError(
                m.ErrorCode.REGISTRATION_FAILED, f"cannot register the KV caches: {exc}"
            ) from None
        registration = self.sessions.add_registration(
            session,
            Registration,
            worker_id=req.worker_id,
            layout=req.layout,
            device=req.device,
            transfer_mode=req.transfer_mode,
            geometry=geometry,
            mapped=mapped,
            shm_names=[seg.name for seg in req.segments if seg.kind == "shm"],
            staging=staging,
            staging_name=staging_name,
            staging_chunks=req.staging_chunks if staging is not None else 0,
            staging_lock_fd=staging_fd,
            event=event,
            shm_dir=self.shm_dir,
            model_name=req.model_name,
            key_seed=req.key_seed,
        )
        log.info(
            "Registered KV cache for worker %d (client %s, pid %d): %d layers, %d blocks of "
            "%d tokens, layout %s, %s on %s (registration %d)",
            req.worker_id, session.session_id, session.pid, len(layers), geometry.num_blocks,
            req.block_size, req.layout, req.transfer_mode, req.device, registration.registration_id,
        )  # fmt: skip
        return m.RegisterReply(
            registration_id=registration.registration_id,
            num_layers=len(layers),
            blocks_per_chunk=blocks_per_chunk,
            chunk_bytes=geometry.chunk_bytes,
            staging_name=staging_name,
            staging_chunks=registration.staging_chunks,
        )

    def _check_registration(self, session: Session, req: m.RegisterRequest) -> None:
        """Bounds of a registration, checked before anything is mapped or allocated."""
        c = self.config
        held = len(session.registrations)
        if held >= c.max_registrations_per_session:
            raise RequestError(
                m.ErrorCode.LIMIT_EXCEEDED,
                f"this session holds {held} registrations, the most allowed "
                "(max_registrations_per_session): unregister before registering again",
            )
        if len(req.layers) > c.max_layers_per_registration:
            raise RequestError(
                m.ErrorCode.LIMIT_EXCEEDED,
                f"{len(req.layers)} layers in one registration; at most "
                f"{c.max_layers_per_registration} (max_layers_per_registration)",
            )
        if len(req.segments) > c.max_segments_per_registration:
            raise RequestError(
                m.ErrorCode.LIMIT_EXCEEDED,
                f"{len(req.segments)} segments in one registration; at most "
                f"{c.max_segments_per_registration} (max_segments_per_registration)",
            )
        for index, seg in enumerate(req.segments):
            if not 0 < seg.nbytes <= _MAX_SEGMENT_BYTES:
                raise RequestError(
                    m.ErrorCode.BAD_REQUEST,
                    f"segment {index} has {seg.nbytes} bytes; a segment has 1 to "
                    f"{_MAX_SEGMENT_BYTES} bytes",
                )
        if req.device not in _DEVICES or len(req.layout) > _MAX_LAYOUT_CHARS:
            raise RequestError(
                m.ErrorCode.BAD_REQUEST,
                f"device must be one of {', '.join(_DEVICES)} and layout at most "
                f"{_MAX_LAYOUT_CHARS} characters",
            )
        if not 0 <= req.worker_id < 1 << 31 or not 0 <= req.block_dim < 64:
            raise RequestError(m.ErrorCode.BAD_REQUEST, "worker_id or block_dim is out of range")
        if len(req.model_name) > _MAX_MODEL_NAME_CHARS or len(req.key_seed) > _MAX_KEY_SEED_BYTES:
            raise RequestError(
                m.ErrorCode.BAD_REQUEST,
                f"model_name is at most {_MAX_MODEL_NAME_CHARS} characters and key_seed at "
                f"most {_MAX_KEY_SEED_BYTES} bytes",
            )

    def _check_staging(self, session: Session, chunks: int, chunk_bytes: int) -> None:
        c = self.config
        held = [r for r in session.registrations.values() if r.staging_chunks]
        total_chunks = chunks + sum(r.staging_chunks for r in held)
        total_bytes = chunks * chunk_bytes + sum(
            r.staging_chunks * r.geometry.chunk_bytes for r in held
        )
        byte_limit = int(c.max_staging_bytes_per_session * 1024**3)
        if total_chunks > c.max_staging_chunks_per_session or total_bytes > byte_limit:
            raise RequestError(
                m.ErrorCode.LIMIT_EXCEEDED,
                f"engine-mode staging of {total_chunks} chunk(s), {total_bytes} bytes for this "
                f"session exceeds max_staging_chunks_per_session "
                f"({c.max_staging_chunks_per_session}) or max_staging_bytes_per_session "
                f"({c.max_staging_bytes_per_session:g} GB): ask for fewer staging_chunks",
            )

    def _map_segment(self, seg: m.SegmentDesc) -> torch.Tensor:
        if seg.kind == "shm":
            return self.shm_dir.map(seg.name, seg.nbytes)
        if seg.kind == "cuda_ipc":
            return cuda_ipc.open_storage(seg.cuda)
        raise LayoutError(f"segment kind {seg.kind!r} is not shareable; use 'shm' or 'cuda_ipc'")

    def _unregister(
        self, session: Session | None, routing_id: bytes, req: m.UnregisterRequest
    ) -> m.UnregisterReply:
        assert session is not None
        registration = self.sessions.remove_registration(session, req.registration_id)
        if registration is None:
            self._refuse_foreign_registration(session, req.registration_id)
            return m.UnregisterReply(removed=False)
        self._release(registration, unlink=False)
        log.info(
            "Unregistered KV cache of worker %d (client %s): %d layers (registration %d)",
            registration.worker_id,
            session.session_id,
            len(registration.geometry.layers),
            registration.registration_id,
        )
        return m.UnregisterReply(removed=True)

    def _release(self, registration: Registration, *, unlink: bool) -> None:
        if self.sessions.close_registration(registration):
            registration.release(unlink_worker_segments=unlink)
        elif unlink:  # in use right now: names may go, the last user drops the mappings
            registration.shm_names, names = [], registration.shm_names
            for name in names:
                self.shm_dir.unlink_if_unheld(name)

    def _keys(self, keys: list[bytes]) -> list[ChunkKey]:
        if len(keys) > self.config.max_keys_per_request:
            raise RequestError(
                m.ErrorCode.LIMIT_EXCEEDED,
                f"{len(keys)} keys in one request; at most {self.config.max_keys_per_request} "
                "(max_keys_per_request): split the request",
            )
        for key in keys:
            if len(key) != KEY_BYTES:
                raise RequestError(
                    m.ErrorCode.BAD_REQUEST,
                    f"chunk keys are {KEY_BYTES} bytes, got one of {len(key)}",
                )
        return [ChunkKey(k) for k in keys]

    def _lookup(
        self, session: Session | None, routing_id: bytes, req: m.LookupRequest
    ) -> m.LookupReply:
        assert session is not None
        keys = self._keys(req.keys)
        ttl = req.lock_ttl_s
        if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
            raise RequestError(
                m.ErrorCode.BAD_REQUEST, f"lock_ttl_s must be a positive number, got {ttl}"
            )
        if ttl is not None and ttl > self.config.max_lock_ttl_secs:
            raise RequestError(
                m.ErrorCode.LIMIT_EXCEEDED,
                f"lock_ttl_s {ttl:g} exceeds the server's limit of "
                f"{self.config.max_lock_ttl_secs:g} s (max_lock_ttl_secs)",
            )
        try:
            result = self.engine.lookup(
                keys,
                lock=req.lock,
                lock_ttl=ttl,
                owner=session.session_id,
                max_owner_locks=self.config.max_locks_per_session,
            )
        except LockLimitError as exc:
            raise RequestError(m.ErrorCode.LIMIT_EXCEEDED, str(exc)) from None
        chunk = self.config.chunk_size
        self.metrics.tokens.labels(kind="lookup").inc(len(keys) * chunk)
        self.metrics.tokens.labels(kind="hit").inc(result.hits * chunk)
        return m.LookupReply(hits=result.hits, lock_id=result.lock_id)

    def _refuse_foreign_registration(self, session: Session, reg_id: int) -> None:
        if self.sessions.owner_of(reg_id) not in (None, session.session_id):
            raise RequestError(
                m.ErrorCode.FORBIDDEN,
                f"registration {reg_id} belongs to another session: a session uses only the "
                "KV caches it registered itself",
            )

    def _acquire(self, session: Session, reg_id: int) -> Registration:
        registration = self.sessions.acquire(session, reg_id)
        if registration is None:
            self._refuse_foreign_registration(session, reg_id)
            raise RequestError(
                m.ErrorCode.NOT_REGISTERED,
                f"registration {reg_id} is unknown to this server: register the KV caches "
                "first (again after a server restart)",
            )
        return registration

    def _finish(self, registration: Registration) -> None:
        if self.sessions.done(registration):
            registration.release(unlink_worker_segments=False)

    def _plan(
        self, registration: Registration, keys: list[bytes], block_ids: list[int]
    ) -> list[Any]:
        geometry = registration.geometry
        try:
            per_chunk = geometry.split(len(keys), block_ids) if keys else []
            geometry.check_blocks(block_ids)
        except ValueError as exc:
            raise RequestError(m.ErrorCode.BAD_REQUEST, str(exc)) from None
        except IndexError as exc:
            raise RequestError(m.ErrorCode.OUT_OF_RANGE, str(exc)) from None
        if registration.staging is not None and len(keys) > registration.staging_chunks:
            raise RequestError(
                m.ErrorCode.BAD_REQUEST,
                f"engine mode moves at most {registration.staging_chunks} chunks per call, "
                f"got {len(keys)}",
            )
        return per_chunk

    def _staging_slot(self, registration: Registration, slot: int, nbytes: int) -> torch.Tensor:
        assert registration.staging is not None
        start = slot * registration.geometry.chunk_bytes
        return registration.staging[start : start + nbytes]

    def _store(
        self, session: Session | None, routing_id: bytes, req: m.StoreRequest
    ) -> m.StoreReply:
        assert session is not None
        start = time.perf_counter()
        keys = self._keys(req.keys)
        registration = self._acquire(session, req.registration_id)
        try:
            per_chunk = self._plan(registration, req.keys, req.block_ids)
            geometry = registration.geometry
            cuda = registration.device == "cuda" and registration.staging is None
            if cuda and registration.event is not None:
                stream = torch.cuda.current_stream(registration.mapped[0].device)
                stream.wait_event(registration.event)  # type: ignore[arg-type]
            stored = duplicates = no_space = 0
            moved = tokens = 0
            for slot, (key, blocks) in enumerate(zip(keys, per_chunk, strict=True)):
                nbytes = geometry.block_bytes * len(blocks)
                outcome, reservation = self.engine.reserve(key, nbytes)
                if outcome is StoreOutcome.DUPLICATE:
                    duplicates += 1
                    stored += 1
                    continue
                if reservation is None:
                    no_space += 1
                    log.warning(
                        "store stopped at chunk %d of %d: L1 %s", slot, len(keys), outcome.value
                    )
                    break
                try:
                    if registration.staging is not None:
                        reservation.span.write([self._staging_slot(registration, slot, nbytes)])
                    else:
                        reservation.span.write(geometry.chunk_views(blocks))
                    if cuda:
                        torch.cuda.current_stream(registration.mapped[0].device).synchronize()
                except BaseException:
                    self.engine.abort(reservation)
                    raise
                self.engine.commit(reservation)
                stored += 1
                moved += nbytes
                tokens += min(len(blocks) * geometry.block_size, self.config.chunk_size)
        finally:
            self._finish(registration)
        self.metrics.bytes.labels(op="store", tier="l1").inc(moved)
        self.metrics.tokens.labels(kind="stored").inc(tokens)
        log.info(
            "Stored %d tokens in %.3f seconds",
            req.num_tokens or tokens,
            time.perf_counter() - start,
        )
        return m.StoreReply(stored=stored, duplicates=duplicates, no_space=no_space)

    def _retrieve(
        self, session: Session | None, routing_id: bytes, req: m.RetrieveRequest
    ) -> m.RetrieveReply:
        assert session is not None
        start = time.perf_counter()
        keys = self._keys(req.keys)
        registration = self._acquire(session, req.registration_id)
        pinned: list[Pinned] = []
        retrieved = moved = tokens = 0
        try:
            per_chunk = self._plan(registration, req.keys, req.block_ids)
            geometry = registration.geometry
            cuda = registration.device == "cuda" and registration.staging is None
            pinned = self.engine.pin(keys)
            for slot, (item, blocks) in enumerate(zip(pinned, per_chunk, strict=False)):
                nbytes = geometry.block_bytes * len(blocks)
                if item.span.nbytes != nbytes:
                    log.warning(
                        "retrieve stopped at chunk %d: stored entry has %d bytes, the blocks "
                        "hold %d (different layout under the same key?)",
                        slot, item.span.nbytes, nbytes,
                    )  # fmt: skip
                    break
                if registration.staging is not None:
                    item.span.read_into([self._staging_slot(registration, slot, nbytes)])
                else:
                    item.span.read_into(geometry.chunk_views(blocks))
                retrieved += 1
                moved += nbytes
                tokens += min(len(blocks) * geometry.block_size, self.config.chunk_size)
            if cuda and retrieved:
                torch.cuda.current_stream(registration.mapped[0].device).synchronize()
        finally:
            if pinned:
                self.engine.unpin(pinned)
            self._finish(registration)
        self.metrics.bytes.labels(op="retrieve", tier="l1").inc(moved)
        self.metrics.tokens.labels(kind="retrieved").inc(tokens)
        log.info("Retrieved %d tokens in %.3f seconds", tokens, time.perf_counter() - start)
        return m.RetrieveReply(retrieved=retrieved)

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
