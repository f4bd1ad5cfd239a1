"""Registration calls of ``NodeClient`` (``node_client.py``): share the worker's KV tensors
with the server, register them again after a server restart, unregister.

Moved out of ``node_client.py`` unchanged (a mixin: the client's state is declared below).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmcache_node.client.calls import ClientCalls
from lmcache_node.client.errors import (
    RemoteError,
)
from lmcache_node.keys import KeyNamespace
from lmcache_node.protocol import messages as m
from lmcache_node.transfer import cuda_ipc, shm
from lmcache_node.transfer.export import ExportedKV, export_kv_caches, layout_tag, local_geometry
from lmcache_node.transfer.layout import KVGeometry

if TYPE_CHECKING:
    pass

log = logging.getLogger("lmcache_node.client.node_client")  # the client's log, as before the split


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


class RegistrationCalls(ClientCalls):
    """``register_kv_caches`` / ``unregister`` and the re-registration after a restart."""

    if TYPE_CHECKING:
        _mutex: threading.Lock
        _registrations: list[Registration]

        def _shm_directory(self) -> shm.ShmDirectory: ...

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
