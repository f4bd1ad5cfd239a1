"""POSIX shared memory segments in one per-cluster directory, mapped through checked fds.

The server owns one directory (``shm_dir``, e.g. ``/dev/shm/lmcache-<namespace>-<cluster>``,
mode 2770, group ``shm_group``) and tells clients its path in the handshake. Every segment
is created there with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and mode 0660 and inherits the
directory's group, so only that group's members (the cluster's cache and vLLM pods) can
open it. Mapping opens the name with ``O_NOFOLLOW``, checks the *open file* (a regular
file of the exact size, one link, the directory's group, nothing for others) and maps that
file through ``/proc/self/fd``: never the name again, so a name swapped after the check is
not what gets mapped. Names follow one pattern and are checked before any filesystem call.
Every name is resolved relative to the directory's own descriptor, opened once.

The worker moves the storage of its CPU KV tensors into a segment and rebinds the tensors to
it in place (``Tensor.set_``), so vLLM keeps using the same tensor objects while the server
maps the same pages. A segment's creator holds a shared flock on it for as long as it lives;
the kernel drops it when the holder dies (whatever the pid namespace), which is how
``ShmDirectory.sweep`` tells a leaked segment from one in use.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmcache_node.transfer.shm_checks import (
    SharedMemoryError,
    check_client_directory,
    check_segment,
    check_server_directory,
    check_type,
    describe,
    give_group,
    make_directory,
    open_directory,
)

log = logging.getLogger(__name__)

__all__ = [
    "SEGMENT_KINDS",
    "Segment",
    "SharedMemoryError",
    "ShmDirectory",
    "check_name",
    "move_to_segment",
    "new_segment_name",
    "storage_bytes",
]

SEGMENT_KINDS = ("kv", "staging", "bench")
_NAME = re.compile(r"lmcache-node-(?:kv|staging|bench)-[0-9]{1,10}-[0-9a-f]{16}")
_NAME_FORM = "lmcache-node-<kv|staging|bench>-<pid>-<16 hex digits>"
SEGMENT_MODE = 0o660
# O_NONBLOCK: a FIFO planted under a segment's name never blocks the open (fstat refuses it)
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def new_segment_name(kind: str) -> str:
    if kind not in SEGMENT_KINDS:
        raise ValueError(f"segment kind must be one of {', '.join(SEGMENT_KINDS)}, got {kind!r}")
    return f"lmcache-node-{kind}-{os.getpid()}-{secrets.token_hex(8)}"


def check_name(name: str) -> str:
    """``name`` if it is one of ours (so no ``/`` and no ``..``), else SharedMemoryError."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise SharedMemoryError(
            f"shared memory name {name!r} is refused: names look like {_NAME_FORM} "
            "(no '/', no '..'); send the name the segment was created with"
        )
    return name


@dataclass(eq=False)
class Segment:
    """A segment this process created: its mapping and the flock that marks it alive."""

    name: str
    tensor: torch.Tensor = field(repr=False)
    lock_fd: int = field(repr=False)

    def release(self) -> None:
        """Drop the flock (the mapping stays valid while ``tensor`` lives)."""
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


class ShmDirectory:
    """One shm directory, opened once; segments are created, mapped and removed in it.

    Get one with ``prepare`` (the server: create or adopt) or ``attach`` (a client: the
    directory the server named). The descriptor closes with ``close`` or when the object
    is garbage collected.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self.gid = os.fstat(fd).st_gid
        self._finalizer = weakref.finalize(self, os.close, fd)
        self._finalizer.atexit = False  # at exit, clients still remove their names through it

    @classmethod
    def prepare(cls, path: str | os.PathLike[str], group: int | None = None) -> ShmDirectory:
        """The server's directory: created 2770 in ``group`` (default: our group) if missing.

        A directory an earlier run left is adopted, segments and all (clients still alive
        re-register their segments after a restart), when it is a real directory owned by
        us or root, in ``group`` and closed to others; we set 2770 again on one we own.
        Anything else is refused with what to do.
        """
        where = Path(path)
        if not where.is_absolute():
            raise SharedMemoryError(f"shm_dir must be an absolute path, got {str(where)!r}")
        gid = os.getegid() if group is None else group
        created = make_directory(where)
        fd = open_directory(where, "the shm directory")
        try:
            if created:
                give_group(fd, where, gid)
            check_server_directory(fd, where, gid)
        except BaseException:
            os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(where)
            raise
        if created:
            log.info("created the shm directory %s (mode 2770, group %d)", where, gid)
        return cls(where, fd)

    @classmethod
    def attach(cls, path: str | os.PathLike[str]) -> ShmDirectory:
        """The directory a cache server named (never created here): a real directory,
        closed to others (our KV cache would be readable there otherwise)."""
        where = Path(path)
        if not where.is_absolute():
            raise SharedMemoryError(
                f"the cache server named a relative shm directory {str(where)!r}; upgrade it"
            )
        fd = open_directory(where, "the cache server's shm directory")
        try:
            check_client_directory(fd, where)
        except BaseException:
            os.close(fd)
            raise
        return cls(where, fd)

    def close(self) -> None:
        self._finalizer()

    def fileno(self) -> int:
        """The directory's descriptor: names in it are resolved relative to this."""
        return self._fd

    # ----- segments -----
    def create(self, kind: str, nbytes: int) -> Segment:
        """A new segment of ``nbytes`` bytes (0660, the directory's group), held by us."""
        name = new_segment_name(kind)
        path = self.path / name
        if nbytes <= 0:
            raise SharedMemoryError(f"cannot create shared memory {path} of {nbytes} bytes")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _FILE_FLAGS
        try:
            fd = os.open(name, flags, SEGMENT_MODE, dir_fd=self._fd)
        except OSError as exc:
            raise SharedMemoryError(
                f"cannot create shared memory {path}: {exc.strerror}; this process needs "
                f"write access to {self.path} (its group {self.gid})"
            ) from None
        try:
            os.fchmod(fd, SEGMENT_MODE)  # whatever the umask
            if os.fstat(fd).st_gid != self.gid:  # a directory without setgid
                _set_group(fd, path, self.gid)
            # Reserve the pages now: a full /dev/shm is an error here, not SIGBUS later.
            os.posix_fallocate(fd, 0, nbytes)
            tensor = _map_fd(fd, nbytes, path)
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException as exc:
            os.close(fd)
            self.unlink(name)
            if isinstance(exc, OSError) and not isinstance(exc, SharedMemoryError):
                raise SharedMemoryError(
                    f"cannot create shared memory {path} of {nbytes} bytes: {exc.strerror}; "
                    f"check that {self.path.parent} has room for it (in pods: the host's "
                    "/dev/shm size)"  # noqa: S108 - a message
                ) from None
            raise
        return Segment(name, tensor, fd)

    def map(self, name: str, nbytes: int, *, owner: int | None = None) -> torch.Tensor:
        """Map an existing segment (never creates one) as a flat uint8 tensor.

        Refused: a symbolic link or anything but a regular file, another size than
        ``nbytes``, a second hard link, another group than the directory's, any access for
        others, and (when given) another owner than ``owner``.
        """
        path = self.path / check_name(name)
        try:
            found = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except FileNotFoundError:
            raise SharedMemoryError(
                f"shared memory {path} does not exist: the worker and the cache server must "
                f"share {self.path} (same host; in pods a hostPath /dev/shm)"
            ) from None
        check_type(path, found)  # before opening: a device node is never opened
        try:
            fd = os.open(name, os.O_RDWR | _FILE_FLAGS, dir_fd=self._fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SharedMemoryError(
                    f"shared memory {path} is a symbolic link: refusing to map it; remove it"
                ) from None
            raise SharedMemoryError(
                f"cannot open shared memory {path} ({describe(found)}): {exc.strerror}; the "
                f"process mapping it must be in the group {self.gid} of {self.path}"
            ) from None
        try:
            check_segment(path, os.fstat(fd), nbytes=nbytes, gid=self.gid, owner=owner)
            return _map_fd(fd, nbytes, path)
        finally:
            os.close(fd)

    def unlink(self, name: str) -> bool:
        """Remove a segment's name (mappings stay valid until dropped); False if not done."""
        try:
            os.unlink(check_name(name), dir_fd=self._fd)
        except SharedMemoryError:
            log.warning("refusing to unlink %r: not a shared memory name of ours", name)
            return False
        except FileNotFoundError:
            return False
        except OSError as exc:
            # e.g. a root-made directory with the sticky bit: report it, keep serving
            log.warning(
                "cannot remove shared memory segment %s (%s; owner uid %s): it stays until its "
                "owner or root removes it",
                self.path / name,
                exc.strerror,
                self._owner(name),
            )
            return False
        return True

    def _owner(self, name: str) -> str:
        try:
            return str(os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_uid)
        except OSError:
            return "unknown"

    def unlink_if_unheld(self, name: str) -> bool:
        """Remove a segment's name unless a live process holds it; junk under one of our
        names (a symbolic link, a FIFO) is removed without being followed or opened."""
        try:
            found = os.stat(check_name(name), dir_fd=self._fd, follow_symlinks=False)
        except (OSError, SharedMemoryError):
            return False
        if not stat.S_ISREG(found.st_mode):
            log.warning("removing %s: not a regular file (%s)", self.path / name, describe(found))
            return self.unlink(name)
        try:
            fd = os.open(name, os.O_RDONLY | _FILE_FLAGS, dir_fd=self._fd)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            now = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (found.st_dev, found.st_ino):
                return False  # replaced meanwhile: judge it at the next sweep
        except (BlockingIOError, FileNotFoundError):
            return False  # held by a live process (a stalled worker keeps its memory)
        finally:
            os.close(fd)
        return self.unlink(name)

    def sweep(self, min_age_s: float = 30.0) -> list[str]:
        """Remove our segments no live process holds (left by a crashed worker or server).

        Never the L1 pool (``shm_pool.POOL_NAME`` is not a segment name): it outlives its
        server by design, for the next one to adopt.
        """
        removed: list[str] = []
        try:
            names = os.listdir(self._fd)
        except OSError as exc:
            log.warning("cannot list the shm directory %s: %s", self.path, exc.strerror)
            return removed
        now = time.time()
        for name in names:
            if _NAME.fullmatch(name) is None:
                continue
            try:
                if now - os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_ctime < min_age_s:
                    continue  # just created: its owner may not hold it yet
            except OSError:
                continue
            if self.unlink_if_unheld(name):
                removed.append(name)
        if removed:
            log.info("removed %d stale shared memory segment(s) of dead processes", len(removed))
        return removed


def _set_group(fd: int, path: Path, gid: int) -> None:
    try:
        os.fchown(fd, -1, gid)
    except OSError as exc:
        raise SharedMemoryError(
            f"cannot give shared memory {path} the group {gid} of its directory: "
            f"{exc.strerror}; run this process with that group (pod securityContext "
            "supplementalGroups or fsGroup)"
        ) from None


def _map_fd(fd: int, nbytes: int, path: Path) -> torch.Tensor:
    """A shared uint8 mapping of the open file ``fd`` (the fd may be closed afterwards).

    ``/proc/self/fd/N`` names the open file itself, not a path to resolve again; torch's
    own file mapping keeps the storage type vLLM's tensors are rebound to.
    """
    try:
        return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=nbytes, dtype=torch.uint8)
    except RuntimeError as exc:
        raise SharedMemoryError(f"cannot map shared memory {path} (needs /proc): {exc}") from None


def storage_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over a whole storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def move_to_segment(tensors: list[torch.Tensor], directory: ShmDirectory) -> Segment:
    """Copy the storage the ``tensors`` share into a new segment and rebind them to it.

    All tensors must view the same storage; their shape, stride, offset and values are
    unchanged, only the memory under them moves.
    """
    storage = tensors[0].untyped_storage()
    segment = directory.create("kv", storage.nbytes())
    segment.tensor.copy_(storage_bytes(storage))
    shared = segment.tensor.untyped_storage()
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
