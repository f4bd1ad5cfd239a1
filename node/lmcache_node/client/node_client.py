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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import torch

from lmcache_node import __version__
from lmcache_node.client.connection import Connection
from lmcache_node.client.errors import (
    IncompatibleServerError,
    NodeAuthenticationError,
    NodeClientError,
    NodeTimeoutError,
    NodeUnavailableError,
    RemoteError,
)
from lmcache_node.keys import HASH_ALGORITHM, KeyNamespace
from lmcache_node.protocol import messages as m
from lmcache_node.protocol.codec import decode_payload
from lmcache_node.protocol.credentials import ClientCredentials
from lmcache_node.retry import RetryPolicy
from lmcache_node.transfer import cuda_ipc, shm
from lmcache_node.transfer.export import ExportedKV, export_kv_caches, layout_tag, local_geometry
from lmcache_node.transfer.layout import KVGeometry
from lmcache_node.transfer.streams import copy_stream

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


@dataclass(eq=False)
class Registration:
    """A registered set of KV tensors; stays valid across server restarts."""

    registration_id: int
    transfer_mode: str
    num_layers: int
    blocks_per_chunk: int
    chunk_bytes: int
    request: m.RegisterRequest = field(repr=False)
    tensors: list[torch.Tensor] = field(repr=False)
    exported: ExportedKV = field(repr=False)
    geometry: KVGeometry | None = field(default=None, repr=False)  # engine mode
    staging: torch.Tensor | None = field(default=None, repr=False)
    staging_chunks: int = 0
    event: Any = field(default=None, repr=False)  # CUDA interprocess event
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class NodeClient:
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

    # ----- registration -----
    def register_kv_caches(
        self,
        kv_caches: list[torch.Tensor],
        *,
        block_dim: int,
        block_size: int,
        namespace: KeyNamespace | None = None,
        worker_id: int | None = None,
        layout: str | None = None,
        transfer_mode: str = "auto",
        staging_chunks: int = 8,
    ) -> Registration:
        """Share ``kv_caches`` (one tensor per layer, all on one device) with the server.

        "shared": CPU storage moves into segments in the server's shm directory (the tensors
        are rebound in place; pass the tensor objects vLLM itself uses) or CUDA IPC handles
        are sent. "engine": the client copies blocks through a server-owned staging area.
        "auto": shared, falling back to engine for CUDA tensors the server cannot open.
        """
        if transfer_mode not in ("auto", *m.TRANSFER_MODES):
            raise ValueError(f"transfer_mode must be auto, shared or engine, got {transfer_mode!r}")
        tensors = list(kv_caches)
        if not tensors:
            raise ValueError("register at least one KV tensor")
        device = tensors[0].device
        mode = "shared" if transfer_mode == "auto" else transfer_mode
        wid = worker_id if worker_id is not None else (namespace.worker_id if namespace else 0)
        lay = layout or (
            namespace.layout
            if namespace
            else layout_tag(tensors, block_dim=block_dim, block_size=block_size)
        )
        # Published by the server so routers compute the same keys (docs/routing.md).
        model_name = namespace.model_name if namespace else ""
        key_seed = namespace.seed() if namespace else b""
        try:
            return self._register(
                tensors, mode, block_dim=block_dim, block_size=block_size,
                worker_id=wid, layout=lay, staging_chunks=staging_chunks,
                model_name=model_name, key_seed=key_seed,
            )  # fmt: skip
        except RemoteError as exc:
            if (
                transfer_mode == "auto"
                and device.type == "cuda"
                and exc.code == m.ErrorCode.REGISTRATION_FAILED.value
            ):
                log.warning(
                    "CUDA IPC registration failed (%s); using engine-driven mode", exc.message
                )
                return self._register(
                    tensors, "engine", block_dim=block_dim, block_size=block_size,
                    worker_id=wid, layout=lay, staging_chunks=staging_chunks,
                    model_name=model_name, key_seed=key_seed,
                )  # fmt: skip
            raise

    def _register(
        self,
        tensors: list[torch.Tensor],
        mode: str,
        *,
        block_dim: int,
        block_size: int,
        worker_id: int,
        layout: str,
        staging_chunks: int,
        model_name: str = "",
        key_seed: bytes = b"",
    ) -> Registration:
        shared_cpu = mode == "shared" and tensors[0].device.type == "cpu"
        exported = export_kv_caches(
            tensors,
            share=mode == "shared",
            shm_dir=self._shm_directory() if shared_cpu else None,
        )
        event = None
        event_handle = b""
        if mode == "shared" and exported.device == "cuda":
            event = torch.cuda.Event(interprocess=True)  # type: ignore[no-untyped-call]
            event.record()
            event_handle = cuda_ipc.export_event(event)
        request = m.RegisterRequest(
            worker_id=worker_id,
            layout=layout,
            block_dim=block_dim,
            block_size=block_size,
            layers=exported.layers,
            segments=exported.segments,
            transfer_mode=mode,
            device=exported.device,
            staging_chunks=staging_chunks,
            event_handle=event_handle,
            model_name=model_name,
            key_seed=key_seed,
        )
        registration = Registration(
            registration_id=0,
            transfer_mode=mode,
            num_layers=len(tensors),
            blocks_per_chunk=0,
            chunk_bytes=0,
            request=request,
            tensors=tensors,
            exported=exported,
            event=event,
        )
        try:
            self._send_registration(registration)
        except BaseException:
            exported.unlink()
            raise
        with self._mutex:
            self._registrations.append(registration)
        return registration

    def _send_registration(self, registration: Registration) -> None:
        reply = self._call(m.Op.REGISTER, registration.request, m.RegisterReply, internal=True)
        registration.registration_id = reply.registration_id
        registration.blocks_per_chunk = reply.blocks_per_chunk
        registration.chunk_bytes = reply.chunk_bytes
        if registration.transfer_mode == "engine":
            registration.staging_chunks = reply.staging_chunks
            registration.staging = self._shm_directory().map(
                reply.staging_name, reply.staging_chunks * reply.chunk_bytes
            )
            if registration.geometry is None:
                request = registration.request
                registration.geometry = local_geometry(
                    registration.tensors,
                    block_dim=request.block_dim,
                    block_size=request.block_size,
                    blocks_per_chunk=reply.blocks_per_chunk,
                )

    def unregister(self, registration: Registration) -> bool:
        with self._mutex:
            if registration in self._registrations:
                self._registrations.remove(registration)
        try:
            reply = self._call(
                m.Op.UNREGISTER,
                m.UnregisterRequest(registration_id=registration.registration_id),
                m.UnregisterReply,
            )
            return reply.removed
        finally:
            registration.exported.unlink()
            registration.staging = None

    # ----- data path -----
    def lookup(
        self, keys: list[bytes], *, lock: bool = False, lock_ttl_s: float | None = None
    ) -> tuple[int, int | None]:
        """Leading chunks found; with ``lock``, also a lock id holding them (free it).

        Within the server's limits: at most ``max_keys_per_request`` leading keys are looked
        up (a prefix lookup, so the answer stays right), and the lock lifetime is capped at
        ``max_lock_ttl_secs``.
        """
        info = self.info
        keys = list(keys)
        if info is not None:
            max_keys = info.limit("max_keys_per_request")
            if max_keys is not None and len(keys) > max_keys:
                keys = keys[: int(max_keys)]
            max_ttl = info.limit("max_lock_ttl_secs")
            if lock_ttl_s is not None and max_ttl is not None and lock_ttl_s > max_ttl:
                lock_ttl_s = max_ttl
        reply = self._call(
            m.Op.LOOKUP, m.LookupRequest(keys=keys, lock=lock, lock_ttl_s=lock_ttl_s), m.LookupReply
        )
        return reply.hits, reply.lock_id

    def store(
        self,
        registration: Registration,
        keys: list[bytes],
        block_ids: list[int],
        *,
        num_tokens: int = 0,
        timeout_s: float | None = None,
    ) -> int:
        """Store chunks from the blocks; returns the leading chunks now cached. The reply
        comes after the data is committed, so a lookup right after it hits."""
        return self._current(
            registration,
            lambda: self._store_once(registration, keys, block_ids, num_tokens, timeout_s),
        )

    def _store_once(
        self,
        registration: Registration,
        keys: list[bytes],
        block_ids: list[int],
        num_tokens: int,
        timeout_s: float | None,
    ) -> int:
        if registration.transfer_mode == "engine":
            return self._engine_transfer(
                registration, keys, block_ids, store=True, timeout=timeout_s
            )
        if registration.event is not None:
            registration.event.record()
        request = m.StoreRequest(
            registration_id=registration.registration_id,
            keys=list(keys),
            block_ids=list(block_ids),
            num_tokens=num_tokens,
        )
        return self._call(m.Op.STORE, request, m.StoreReply, timeout=timeout_s).stored

    def retrieve(
        self,
        registration: Registration,
        keys: list[bytes],
        block_ids: list[int],
        *,
        timeout_s: float | None = None,
    ) -> int:
        """Write the leading cached chunks into the blocks; returns how many."""
        return self._current(
            registration, lambda: self._retrieve_once(registration, keys, block_ids, timeout_s)
        )

    def _current(self, registration: Registration, action: Callable[[], int]) -> int:
        """Run ``action``; if the session was re-established meanwhile (server restart or a
        dropped session), the registration got a new id: run it once more with that id."""
        used = registration.registration_id
        try:
            return action()
        except RemoteError as exc:
            if exc.code != m.ErrorCode.NOT_REGISTERED.value or registration.registration_id == used:
                raise
            return action()

    def _retrieve_once(
        self,
        registration: Registration,
        keys: list[bytes],
        block_ids: list[int],
        timeout_s: float | None,
    ) -> int:
        if registration.transfer_mode == "engine":
            return self._engine_transfer(
                registration, keys, block_ids, store=False, timeout=timeout_s
            )
        request = m.RetrieveRequest(
            registration_id=registration.registration_id, keys=list(keys), block_ids=list(block_ids)
        )
        return self._call(m.Op.RETRIEVE, request, m.RetrieveReply, timeout=timeout_s).retrieved

    def _engine_transfer(
        self,
        registration: Registration,
        keys: list[bytes],
        block_ids: list[int],
        *,
        store: bool,
        timeout: float | None,
    ) -> int:
        """Engine-driven mode: the worker copies through the staging area, batch by batch."""
        geometry = registration.geometry
        assert geometry is not None
        per_chunk = geometry.split(len(keys), block_ids) if keys else []
        geometry.check_blocks(block_ids)
        done = 0
        batch = max(1, registration.staging_chunks)
        with registration.lock:
            for first in range(0, len(keys), batch):
                staging = registration.staging
                if staging is None:
                    raise NodeUnavailableError(
                        "the registration has no staging area (server restarting?)"
                    )
                chunk_keys = list(keys[first : first + batch])
                chunk_blocks = per_chunk[first : first + batch]
                flat = [b for blocks in chunk_blocks for b in blocks]
                slots = [
                    staging[
                        i * registration.chunk_bytes : i * registration.chunk_bytes
                        + geometry.block_bytes * len(blocks)
                    ]
                    for i, blocks in enumerate(chunk_blocks)
                ]
                if store:
                    for slot, blocks in zip(slots, chunk_blocks, strict=True):
                        copy_stream([slot], geometry.chunk_views(blocks))
                    _sync(registration)
                    reply_s = self._call(
                        m.Op.STORE,
                        m.StoreRequest(registration.registration_id, chunk_keys, flat),
                        m.StoreReply,
                        timeout=timeout,
                    )
                    count = reply_s.stored
                else:
                    reply_r = self._call(
                        m.Op.RETRIEVE,
                        m.RetrieveRequest(registration.registration_id, chunk_keys, flat),
                        m.RetrieveReply,
                        timeout=timeout,
                    )
                    count = reply_r.retrieved
                    for slot, blocks in zip(slots[:count], chunk_blocks[:count], strict=True):
                        copy_stream(geometry.chunk_views(blocks), [slot])
                    _sync(registration)
                done += count
                if count < len(chunk_keys):
                    break
        return done

    def store_async(
        self, registration: Registration, keys: list[bytes], block_ids: list[int], **kwargs: Any
    ) -> Future[int]:
        return self._executor.submit(self.store, registration, keys, block_ids, **kwargs)

    def retrieve_async(
        self, registration: Registration, keys: list[bytes], block_ids: list[int], **kwargs: Any
    ) -> Future[int]:
        return self._executor.submit(self.retrieve, registration, keys, block_ids, **kwargs)

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


def _sync(registration: Registration) -> None:
    """Engine mode on CUDA: the staging copies must be complete before the next step."""
    device = registration.tensors[0].device
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _remove_names_at_exit(ref: weakref.ref[NodeClient]) -> None:
    client = ref()
    if client is None:
        return
    with client._mutex:
        registrations = list(client._registrations)
    for registration in registrations:
        registration.exported.unlink()
