"""The L1 pool's segment: one fixed name in the shm directory, the server's alone, locked.

``lmcache-node-pool`` (``POOL_NAME``) in ``shm_dir``, mode 0600 and owned by the server's
user: clients never map it. The server that uses it holds an exclusive flock on it for its
whole life; the kernel drops the lock when the holder dies, however it dies, so a lock that
can be taken means no live process uses the pool. Two servers therefore never share one:
the second waits ``LOCK_WAIT_S`` and gets ``PoolBusyError``. Anything else under the name (a
link, a FIFO, another user's file, a file with a second link or open to the group) is never
adopted: it is replaced by a fresh file. The stale-segment sweep never touches the name.

The format of what is inside is ``lmcache_node.engine.journal``'s business, not this module's.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from lmcache_node.transfer.shm import ShmDirectory
from lmcache_node.transfer.shm_checks import SharedMemoryError, describe

log = logging.getLogger(__name__)

POOL_NAME = "lmcache-node-pool"
POOL_MODE = 0o600
LOCK_WAIT_S = 2.0  # a predecessor that is still exiting, or `pool show` reading it
_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_POPULATE_STEP = 32 * 1024**2  # the call holds the process's mmap lock: short steps


class PoolBusyError(SharedMemoryError):
    """A live process holds the pool."""


class PoolFile:
    """The open pool file, locked by this process until ``close``, its garbage collection
    or the process's death."""

    def __init__(self, directory: ShmDirectory, fd: int) -> None:
        self.directory = directory
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    @property
    def path(self) -> Path:
        return self.directory.path / POOL_NAME

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    @classmethod
    def acquire(cls, directory: ShmDirectory, *, wait_s: float = LOCK_WAIT_S) -> PoolFile:
        """Open (or create, empty) and lock the pool of ``directory``.

        PoolBusyError when another live process holds it after ``wait_s``;
        SharedMemoryError when the name cannot be used at all.
        """
        for _ in range(3):
            fd = _open_or_create(directory)
            if fd is None:
                continue  # created by someone else meanwhile: open theirs
            try:
                lock(fd, wait_s, directory.path / POOL_NAME)
                if _names(directory, fd):
                    return cls(directory, fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # removed or replaced between the open and the lock: again
        raise SharedMemoryError(
            f"{directory.path / POOL_NAME} kept changing while this server opened it: another "
            "process is replacing it"
        )

    def read_header(self, nbytes: int) -> bytes:
        return os.pread(self.fd, nbytes, 0)

    def reset(self, nbytes: int) -> None:
        """Empty the file and give it ``nbytes`` of zeroed, allocated memory."""
        try:
            os.ftruncate(self.fd, 0)
            os.posix_fallocate(self.fd, 0, nbytes)
        except OSError as exc:
            raise SharedMemoryError(
                f"cannot give the L1 pool {self.path} {nbytes} bytes: {exc.strerror}; "
                f"{self.directory.path.parent} is too small for it (on a node: the host's "
                "/dev/shm size), or lower max_local_cpu_size"  # noqa: S108 - a message
            ) from None

    def map(self) -> torch.Tensor:
        """The whole file as a shared uint8 tensor (stays valid after ``close``)."""
        try:
            return torch.from_file(
                f"/proc/self/fd/{self.fd}", shared=True, size=self.size, dtype=torch.uint8
            )
        except RuntimeError as exc:
            raise SharedMemoryError(f"cannot map the L1 pool {self.path}: {exc}") from None

    def discard(self) -> None:
        """Remove the name (still ours: we hold the lock) and close."""
        if _names(self.directory, self.fd):
            try:
                os.unlink(POOL_NAME, dir_fd=self.directory.fileno())
            except OSError as exc:
                log.warning("cannot remove %s: %s", self.path, exc.strerror)
        self.close()

    def close(self) -> None:
        """Drop the lock (a mapping stays valid)."""
        self._finalizer()
        self.fd = -1


def lock(fd: int, wait_s: float, path: Path) -> None:
    """An exclusive flock on ``fd`` within ``wait_s``, else PoolBusyError."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise PoolBusyError(
                    f"the L1 pool {path} is in use by another live cache server on the same "
                    "shm_dir (two servers never share a pool); give each server its own shm_dir"
                ) from None
            time.sleep(0.05)


def is_held(fd: int) -> bool:
    """Whether a live process holds the pool open with its lock (``fd``: ours, unlocked)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def untrusted(st: os.stat_result) -> str | None:
    """Why a file under the pool's name must not be adopted; None when it may be."""
    if not stat.S_ISREG(st.st_mode):
        return f"it is not a regular file ({describe(st)})"
    if st.st_nlink != 1:
        return f"it has {st.st_nlink} hard links"
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by this server (uid {os.geteuid()})"
    if st.st_mode & 0o077:
        return f"others than its owner may access it ({describe(st)})"
    return None


def _open_or_create(directory: ShmDirectory) -> int | None:
    """The pool file, opened: the one there if it may be adopted, else a new empty one."""
    dir_fd = directory.fileno()
    try:
        fd = os.open(POOL_NAME, os.O_RDWR | _FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return _create(directory)
    except OSError as exc:  # ELOOP: a symbolic link; EACCES: another user's; EISDIR
        _replace(directory, f"it cannot be opened ({exc.strerror})")
        return _create(directory)
    problem = untrusted(os.fstat(fd))
    if problem is None:
        return fd
    os.close(fd)
    _replace(directory, problem)
    return _create(directory)


def _replace(directory: ShmDirectory, problem: str) -> None:
    path = directory.path / POOL_NAME
    log.warning("not adopting %s: %s; removing it for a new pool", path, problem)
    try:
        os.unlink(POOL_NAME, dir_fd=directory.fileno())
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SharedMemoryError(
            f"{path} cannot be used as the L1 pool ({problem}) and cannot be removed "
            f"({exc.strerror}): remove it by hand"
        ) from None


def _create(directory: ShmDirectory) -> int | None:
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _FLAGS
    try:
        fd = os.open(POOL_NAME, flags, POOL_MODE, dir_fd=directory.fileno())
    except FileExistsError:
        return None
    except OSError as exc:
        raise SharedMemoryError(
            f"cannot create the L1 pool {directory.path / POOL_NAME}: {exc.strerror}"
        ) from None
    os.fchmod(fd, POOL_MODE)  # whatever the umask
    return fd


def _names(directory: ShmDirectory, fd: int) -> bool:
    """Whether the pool's name still leads to the open file ``fd``."""
    try:
        now = os.stat(POOL_NAME, dir_fd=directory.fileno(), follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def remove_pool(
    directory: ShmDirectory, *, wait_s: float, not_a_pool: Callable[[bytes], str | None]
) -> bool:
    """Remove the pool once no live process holds it (waiting ``wait_s``); False if none.

    ``not_a_pool(first bytes)`` says why a file under the name is not ours (then it stays
    and SharedMemoryError says so). PoolBusyError when a live process still holds it.
    """
    path = directory.path / POOL_NAME
    try:
        found = os.stat(POOL_NAME, dir_fd=directory.fileno(), follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(found.st_mode):
        raise SharedMemoryError(f"{path} is not a regular file ({describe(found)}): not a pool")
    try:
        fd = os.open(POOL_NAME, os.O_RDONLY | _FLAGS, dir_fd=directory.fileno())
    except OSError as exc:
        hint = f"; run this as the cache server's user (uid {found.st_uid})"
        raise SharedMemoryError(
            f"cannot open {path}: {exc.strerror}" + (hint if exc.errno == errno.EACCES else "")
        ) from None
    try:
        problem = not_a_pool(os.pread(fd, 4096, 0))
        if problem is not None:
            raise SharedMemoryError(f"{path} is not an lmcache-node L1 pool ({problem})")
        lock(fd, wait_s, path)
        if _names(directory, fd):
            os.unlink(POOL_NAME, dir_fd=directory.fileno())
    finally:
        os.close(fd)
    return True


def populate(tensor: torch.Tensor) -> None:
    """Map every page of a shared mapping now (MADV_POPULATE_WRITE), so first copies into
    and out of it take no page faults; the bytes are unchanged. Asks for huge pages first
    (MADV_HUGEPAGE: used where the host allows them for shmem, transparent_hugepage/
    shmem_enabled ``advise``). Best effort: a kernel without these (before 5.14) faults pages
    in as they are used."""
    if tensor.numel() == 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    base, size = tensor.data_ptr(), tensor.numel()
    libc.madvise(base, size, _MADV_HUGEPAGE)
    start = time.monotonic()
    for offset in range(0, size, _POPULATE_STEP):
        step = min(_POPULATE_STEP, size - offset)
        if libc.madvise(base + offset, step, _MADV_POPULATE_WRITE) != 0:
            log.debug("MADV_POPULATE_WRITE: %s", os.strerror(ctypes.get_errno()))
            return
    elapsed = time.monotonic() - start
    log.debug("populated the L1 pool's %d bytes in %.2f s", tensor.numel(), elapsed)
