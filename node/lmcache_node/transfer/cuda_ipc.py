"""CUDA IPC: share a worker's KV storage with the server by handle (no copy, no pickle).

The handle fields are those of ``UntypedStorage._share_cuda_()`` (device, IPC memory
handle, size, offset in the allocation, ref-counter file and offset, event handle, sync
flag); they travel as msgpack bytes/ints. Torch keeps the ref-counter file in /dev/shm, so
the worker and the server need the same /dev/shm (a hostPath in pods, not hostIPC).
"""

from __future__ import annotations

from typing import Any

import torch


class CudaIpcError(RuntimeError):
    """The handle could not be exported or opened (e.g. the server cannot see the GPU)."""


def export_storage(storage: torch.UntypedStorage) -> list[Any]:
    fields = storage._share_cuda_()  # type: ignore[no-untyped-call]
    return [_plain(value) for value in fields]


def open_storage(fields: list[Any]) -> torch.Tensor:
    """Open an exported storage as a flat uint8 tensor on its device."""
    if not torch.cuda.is_available():
        raise CudaIpcError(
            "this server cannot see a CUDA device, so it cannot open CUDA IPC handles: run the "
            "cache pod with NVIDIA_VISIBLE_DEVICES=all, or register with transfer_mode='engine'"
        )
    if len(fields) != 8:
        raise CudaIpcError(f"a CUDA IPC handle has 8 fields, got {len(fields)}")
    try:
        storage = torch.UntypedStorage._new_shared_cuda(*fields)
    except RuntimeError as exc:
        raise CudaIpcError(f"cannot open the CUDA IPC handle: {exc}") from exc
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _plain(value: object) -> Any:
    if isinstance(value, torch.device):
        return value.index or 0
    return value


def export_event(event: torch.cuda.Event) -> bytes:
    return bytes(event.ipc_handle())  # type: ignore[no-untyped-call]


def open_event(device: int, handle: bytes) -> torch.cuda.Event:
    event: torch.cuda.Event = torch.cuda.Event.from_ipc_handle(device, handle)  # type: ignore[no-untyped-call]
    return event
