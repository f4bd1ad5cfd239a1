"""Registration ops of ``RequestHandler`` (``handlers.py``): register, unregister, and the
bounds a registration is checked against before anything is mapped or allocated.

Moved out of ``handlers.py`` unchanged (a mixin: the handler's state is declared below).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from lmcache_node.config import NodeConfig
from lmcache_node.protocol import messages as m
from lmcache_node.server.errors import RequestError
from lmcache_node.server.state import Registration, Session, SessionTable
from lmcache_node.transfer import cuda_ipc, shm
from lmcache_node.transfer.layout import KVGeometry, LayerGeometry, LayoutError

log = logging.getLogger("lmcache_node.server.handlers")  # the handler's log, as before the split

_MAX_SEGMENT_BYTES = 1 << 48  # 256 TiB: above any real KV allocation, far below int64
_MAX_LAYOUT_CHARS = 256
_MAX_MODEL_NAME_CHARS = 1024
_MAX_KEY_SEED_BYTES = 64
_DEVICES = ("cpu", "cuda", "xpu")


class RegistrationOps:
    """``REGISTER`` / ``UNREGISTER``: map a worker's KV segments (or set up its staging
    area in engine mode) and check every count and size first."""

    if TYPE_CHECKING:
        config: NodeConfig
        shm_dir: shm.ShmDirectory
        sessions: SessionTable

        def _refuse_foreign_registration(self, session: Session, reg_id: int) -> None: ...

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
