"""POSIX shared memory segments under /dev/shm, mapped with ``torch.from_file``.

The worker moves the storage of its CPU KV tensors into a named segment and rebinds the
tensors to it in place (``Tensor.set_``), so vLLM keeps using the same tensor objects
while the server maps the same pages by name. Names carry our prefix and are checked
before the server opens or removes anything.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import time
import uuid
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SHM_DIR = Path(os.environ.get("LMCACHE_NODE_SHM_DIR", "/dev/shm"))  # noqa: S108 - POSIX shm
SHM_PREFIX = "lmcache-node-"
_NAME = re.compile(r"^lmcache-node-[A-Za-z0-9_.-]{1,200}$")


class SharedMemoryError(OSError):
    """A segment that cannot be created, found or mapped."""


def new_segment_name(kind: str = "kv") -> str:
    return f"{SHM_PREFIX}{kind}-{os.getpid()}-{uuid.uuid4().hex[:16]}"


def segment_path(name: str) -> Path:
    if not _NAME.match(name) or ".." in name:
        raise SharedMemoryError(
            f"shared memory name {name!r} is not ours: names look like {SHM_PREFIX}<id>"
        )
    return SHM_DIR / name


def create_segment(name: str, nbytes: int) -> torch.Tensor:
    """Create (or truncate) a segment and map it as a flat uint8 tensor."""
    path = segment_path(name)
    try:
        with open(path, "wb") as file:
            file.truncate(nbytes)
        return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
    except (OSError, RuntimeError) as exc:
        raise SharedMemoryError(
            f"cannot create shared memory {path} of {nbytes} bytes: {exc}; check that "
            f"{SHM_DIR} is mounted and large enough (in pods: a hostPath /dev/shm)"
        ) from exc


def map_segment(name: str, nbytes: int) -> torch.Tensor:
    """Map an existing segment (never creates one)."""
    path = segment_path(name)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SharedMemoryError(
            f"shared memory {path} is not visible to the server ({exc.strerror}): the worker "
            "and the cache server must share /dev/shm (same host, hostPath /dev/shm in pods)"
        ) from None
    if size < nbytes:
        raise SharedMemoryError(f"shared memory {path} has {size} bytes, expected {nbytes}")
    try:
        return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
    except RuntimeError as exc:
        raise SharedMemoryError(f"cannot map shared memory {path}: {exc}") from exc


def unlink_segment(name: str) -> bool:
    """Remove a segment's name (mappings stay valid until dropped); False if already gone."""
    try:
        segment_path(name).unlink()
    except FileNotFoundError:
        return False
    except SharedMemoryError:
        log.warning("refusing to unlink foreign shared memory name %r", name)
        return False
    except OSError as exc:
        # e.g. a segment another user left in the sticky /dev/shm: report it, keep serving
        path = segment_path(name)
        log.warning(
            "cannot remove shared memory segment %s (%s; owner uid %s): it stays until its "
            "owner or root removes it",
            path,
            exc.strerror,
            _owner(path),
        )
        return False
    return True


def _owner(path: Path) -> str:
    try:
        return str(path.stat().st_uid)
    except OSError:
        return "unknown"


def hold_segment(name: str) -> int:
    """Take a shared flock on a segment for as long as the returned fd stays open.

    The kernel drops it when the holder dies, whatever the pid namespace: that is how
    ``sweep_stale_segments`` tells a leaked segment from one in use.
    """
    fd = os.open(segment_path(name), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def unlink_if_unheld(name: str) -> bool:
    """Remove a segment's name unless a live process holds it (see ``hold_segment``)."""
    try:
        fd = os.open(segment_path(name), os.O_RDONLY)
    except (OSError, SharedMemoryError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # held by a live process (a stalled worker keeps its memory)
    finally:
        os.close(fd)
    return unlink_segment(name)


def sweep_stale_segments(min_age_s: float = 30.0) -> list[str]:
    """Remove our segments no live process holds (left by a crashed worker or server)."""
    removed: list[str] = []
    try:
        entries = list(SHM_DIR.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not _NAME.match(entry.name):
            continue
        try:
            if now - entry.stat().st_ctime < min_age_s:
                continue  # just created: its owner may not hold it yet
        except OSError:
            continue
        if unlink_if_unheld(entry.name):
            removed.append(entry.name)
    if removed:
        log.info("removed %d stale shared memory segment(s) of dead processes", len(removed))
    return removed


def storage_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over a whole storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def move_to_segment(tensors: list[torch.Tensor], name: str) -> torch.Tensor:
    """Copy the storage the ``tensors`` share into a new segment and rebind them to it.

    All tensors must view the same storage; their shape, stride, offset and values are
    unchanged, only the memory under them moves.
    """
    storage = tensors[0].untyped_storage()
    nbytes = storage.nbytes()
    segment = create_segment(name, nbytes)
    segment.copy_(storage_bytes(storage))
    shared = segment.untyped_storage()
    old_pointer = storage.data_ptr()
    rebound: set[int] = set()
    for tensor in tensors:
        # A view keeps its base alive: rebind the bases too, or the old memory stays.
        chain: list[torch.Tensor] = [tensor]
        base = tensor._base
        while base is not None:
            chain.append(base)
            base = base._base
        for item in chain:
            if id(item) in rebound or item.untyped_storage().data_ptr() != old_pointer:
                continue
            rebound.add(id(item))
            item.set_(shared, item.storage_offset(), item.shape, item.stride())
    return segment
