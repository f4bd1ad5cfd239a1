"""Data ops of ``RequestHandler`` (``handlers.py``): lookup, store, retrieve.

Moved out of ``handlers.py`` unchanged (a mixin: the handler's state is declared below).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from lmcache_node.config import NodeConfig
from lmcache_node.engine.core import CacheEngine, Pinned
from lmcache_node.engine.types import LockLimitError, StoreOutcome
from lmcache_node.keys import KEY_BYTES, ChunkKey
from lmcache_node.metrics import NodeMetrics
from lmcache_node.protocol import messages as m
from lmcache_node.server.errors import RequestError
from lmcache_node.server.state import Registration, Session, SessionTable

log = logging.getLogger("lmcache_node.server.handlers")  # the handler's log, as before the split


class DataOps:
    """``LOOKUP`` / ``STORE`` / ``RETRIEVE``: keys checked, registrations owned by the
    session's identity, bytes copied between the registration's blocks and L1 pages."""

    if TYPE_CHECKING:
        config: NodeConfig
        engine: CacheEngine
        metrics: NodeMetrics
        sessions: SessionTable

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
