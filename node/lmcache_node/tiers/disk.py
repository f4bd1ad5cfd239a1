"""The local disk tier (L2): one framed file per chunk, crash safe, capped, restart-recoverable.

Write: reserve space (evicting least recently used files), write a unique temporary file,
fsync, rename over the final name, then publish in the index. Read: open, check the header,
read into the caller's buffers, check the payload checksum; anything that does not check out is
a miss and the file is deleted. Start-up: rebuild the index from the directory (temporary files
removed), least recently used first by mtime. One process owns a directory (flock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import xxhash

from lmcache_node.keys import KEY_BYTES, ChunkKey
from lmcache_node.tiers.base import RateLimitedLog, TierStats, numpy_views
from lmcache_node.tiers.directio import DirectIO, open_direct
from lmcache_node.tiers.frame import (
    DEFAULT_LAYOUT,
    DISK_HEADER_BYTES,
    Codec,
    FrameError,
    FrameHeader,
    check_header,
    decode_header,
    encode_header,
)
from lmcache_node.tiers.workers import TaskPool

log = logging.getLogger(__name__)

SUFFIX = ".lmc"
TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".lmcache-disk.lock"
BLOCK = 4096
PIECE_BYTES = 2 * 1024**2
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

# (event, key) with event "stored" or "evicted"; called under the tier's lock: be quick
KeyListener = Callable[[str, ChunkKey], None]


def file_bytes_for(nbytes: int) -> int:
    """Space charged against the cap for a chunk of ``nbytes`` (header + payload, in blocks)."""
    return -(-(DISK_HEADER_BYTES + nbytes) // BLOCK) * BLOCK


class DiskTier:
    """L2: chunk files under ``root``, at most ``capacity_bytes`` of them."""

    name = "disk"

    def __init__(
        self,
        root: Path,
        capacity_bytes: int,
        *,
        use_odirect: bool = False,
        layout: str = DEFAULT_LAYOUT,
        workers: int = 2,
        max_pending: int = 32,
        lock_wait_secs: float = 10.0,
    ) -> None:
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.layout = layout
        self.pool = TaskPool("disk-tier", workers, max_pending)
        self._mutex = threading.Lock()
        self._index: OrderedDict[ChunkKey, int] = OrderedDict()
        self._writing: set[ChunkKey] = set()
        self._used = 0
        self._reserved = 0
        self._deleting = 0
        self._temp_ids = itertools.count()
        self._stats = TierStats(name=self.name, capacity_bytes=capacity_bytes)
        self._warn = RateLimitedLog(log)
        self._lock_fd: int | None = None
        self.key_listeners: list[KeyListener] = []  # index changes (routing events)
        self.direct = DirectIO(use_odirect)
        self.rebuild_seconds = 0.0
        self.available = self._open(lock_wait_secs)

    # ----- start-up -----
    def _open(self, lock_wait_secs: float) -> bool:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = _open_lock_file(self.root / LOCK_NAME)
        except OSError as exc:
            log.error(
                "disk tier disabled: cannot use %s (%s); check local_disk and that the "
                "directory is writable",
                self.root,
                exc,
            )
            return False
        deadline = time.monotonic() + lock_wait_secs
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    log.error(
                        "disk tier disabled: another process holds %s; give each cache "
                        "server its own local_disk directory",
                        self.root / LOCK_NAME,
                    )
                    return False
                time.sleep(0.1)
        self._lock_fd = fd
        started = time.perf_counter()
        self._rebuild()
        self.rebuild_seconds = time.perf_counter() - started
        log.info(
            "disk tier %s: %d chunk file(s), %d of %d bytes, index rebuilt in %.3f s",
            self.root,
            len(self._index),
            self._used,
            self.capacity_bytes,
            self.rebuild_seconds,
        )
        return True

    def _rebuild(self) -> None:
        found: list[tuple[float, ChunkKey, int]] = []
        removed = 0
        for shard in os.scandir(self.root):
            if not shard.is_dir(follow_symlinks=False) or len(shard.name) != 2:
                continue
            for item in os.scandir(shard.path):
                name = item.name
                if name.endswith(TEMP_SUFFIX):
                    removed += _unlink_quiet(item.path)
                    continue
                key = _key_from_name(name)
                if key is None:
                    continue
                try:
                    info = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if info.st_size < DISK_HEADER_BYTES:
                    removed += _unlink_quiet(item.path)
                    continue
                found.append((info.st_mtime, key, info.st_size - DISK_HEADER_BYTES))
        found.sort(key=lambda row: row[0])
        for _, key, nbytes in found:
            self._index[key] = nbytes
            self._used += file_bytes_for(nbytes)
        if removed:
            log.info("disk tier: removed %d temporary or truncated file(s) at start-up", removed)
        over = self._pick_victims_locked(0)
        for path, _size in over:
            _unlink_quiet(str(path))
        self._deleting = 0

    # ----- paths -----
    def path_for(self, key: ChunkKey) -> Path:
        name = key.hex()
        return self.root / name[:2] / (name + SUFFIX)

    def _temp_path(self, key: ChunkKey) -> Path:
        name = key.hex()
        unique = f".{name}.{os.getpid()}.{next(self._temp_ids)}{TEMP_SUFFIX}"
        return self.root / name[:2] / unique

    # ----- queries -----
    def has(self, key: ChunkKey) -> bool:
        with self._mutex:
            return key in self._index

    def locate(self, keys: Sequence[ChunkKey]) -> list[int]:
        sizes: list[int] = []
        if not self.available:
            return sizes
        with self._mutex:
            self._stats.lookups += 1
            for key in keys:
                nbytes = self._index.get(key)
                if nbytes is None:
                    break
                sizes.append(nbytes)
            if sizes:
                self._stats.lookup_hits += 1
        return sizes

    # ----- space -----
    def _pick_victims_locked(self, need: int) -> list[tuple[Path, int]]:
        """Drop LRU entries from the index until ``need`` more bytes fit under the cap.

        Victims stay counted (as deleting) until their files are gone; the caller deletes
        them before it writes, so its own victims do not count against its reservation.
        """
        victims: list[tuple[Path, int]] = []
        picked = 0
        while self._index and self._charged() - picked + need > self.capacity_bytes:
            key, nbytes = self._index.popitem(last=False)
            size = file_bytes_for(nbytes)
            self._used -= size
            self._deleting += size
            picked += size
            self._stats.evictions += 1
            self._stats.evicted_bytes += size
            victims.append((self.path_for(key), size))
            self._notify("evicted", key)
        return victims

    def _notify(self, event: str, key: ChunkKey) -> None:
        for listener in self.key_listeners:
            listener(event, key)

    def _charged(self) -> int:
        return self._used + self._reserved + self._deleting

    def _reserve(self, key: ChunkKey, size: int) -> list[tuple[Path, int]] | None:
        """Reserve ``size`` bytes for ``key``; the files to delete first, or None if it cannot."""
        with self._mutex:
            if key in self._index or key in self._writing or size > self.capacity_bytes:
                return None
            victims = self._pick_victims_locked(size)
            own = sum(victim_size for _, victim_size in victims)
            if self._charged() - own + size > self.capacity_bytes:
                # Only in-flight writes and deletes remain: this store is dropped.
                self._unlink_victims_locked(victims)
                return None
            self._reserved += size
            self._writing.add(key)
            return victims

    def _unlink_victims_locked(self, victims: list[tuple[Path, int]]) -> None:
        # The victims already left the index: delete their files now (cheap unlinks).
        for path, size in victims:
            _unlink_quiet(str(path))
            self._deleting -= size

    def _delete_files(self, victims: list[tuple[Path, int]]) -> None:
        for path, size in victims:
            _unlink_quiet(str(path))
            with self._mutex:
                self._deleting -= size

    # ----- writes -----
    def store_from(self, key: ChunkKey, srcs: Sequence[torch.Tensor], nbytes: int) -> bool:
        if not self.available:
            return False
        size = file_bytes_for(nbytes)
        victims = self._reserve(key, size)
        if victims is None:
            with self._mutex:
                duplicate = key in self._index or key in self._writing
                if not duplicate:
                    self._stats.dropped_stores += 1
            return duplicate
        self._delete_files(victims)
        final = self.path_for(key)
        temp = self._temp_path(key)
        try:
            self._write_file(key, temp, srcs, nbytes)
            os.rename(temp, final)
        except OSError as exc:
            _unlink_quiet(str(temp))
            with self._mutex:
                self._reserved -= size
                self._writing.discard(key)
                self._stats.errors += 1
                self._stats.dropped_stores += 1
            if exc.errno in _FULL_ERRNOS:
                self._warn.warning(
                    "disk-full",
                    "disk tier %s: store skipped, the disk is full or read-only (%s); "
                    "free space or lower max_local_disk_size",
                    self.root,
                    exc,
                )
            else:
                self._warn.warning("disk-write", "disk tier: write of %s failed: %s", final, exc)
            return False
        with self._mutex:
            self._reserved -= size
            self._writing.discard(key)
            self._index[key] = nbytes
            self._used += size
            self._stats.stores += 1
            self._stats.stored_bytes += nbytes
            self._notify("stored", key)
        return True

    def _write_file(
        self, key: ChunkKey, temp: Path, srcs: Sequence[torch.Tensor], nbytes: int
    ) -> None:
        temp.parent.mkdir(exist_ok=True)
        fd = open_direct(self.direct, temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, log)
        try:
            if fd.direct:
                make_header = functools.partial(self._header, key, nbytes)
                self.direct.write_frame(fd.fd, make_header, srcs, nbytes)
            else:
                # One pass over the source: hash each piece while it is hot, write it; the
                # header (with the checksum) goes in last, at offset 0.
                hasher = xxhash.xxh3_64()
                offset = DISK_HEADER_BYTES
                for piece in _pieces(numpy_views(srcs)):
                    hasher.update(piece)
                    _pwrite_all(fd.fd, piece, offset)
                    offset += len(piece)
                header = self._header(key, nbytes, int(hasher.intdigest()))
                _pwrite_all(fd.fd, memoryview(header), 0)
            os.fsync(fd.fd)
        finally:
            os.close(fd.fd)

    def _header(self, key: ChunkKey, nbytes: int, checksum: int) -> bytes:
        return encode_header(
            FrameHeader(
                key=key,
                codec=Codec.NAIVE,
                header_len=DISK_HEADER_BYTES,
                stored_len=nbytes,
                raw_len=nbytes,
                checksum=checksum,
                layout=self.layout,
            )
        )

    # ----- reads -----
    def load_into(self, key: ChunkKey, dsts: Sequence[torch.Tensor], nbytes: int) -> bool:
        if not self.available:
            return False
        with self._mutex:
            if key not in self._index:
                self._stats.misses += 1
                return False
            self._index.move_to_end(key)
        path = self.path_for(key)
        try:
            fd = open_direct(self.direct, path, os.O_RDONLY, log)
        except FileNotFoundError:
            self._forget(key, delete=False)
            self._stats.misses += 1
            return False
        except OSError as exc:
            self._count_error("disk-read", "disk tier: cannot open %s: %s", path, exc)
            return False
        try:
            if fd.direct:
                header, checksum = self.direct.read_frame(fd.fd, dsts, nbytes)
            else:
                header, checksum = self._read_buffered(fd.fd, dsts, nbytes)
            check_header(header, key, self.layout)
            if header.raw_len != nbytes or header.stored_len != nbytes:
                raise FrameError(f"frame holds {header.raw_len} bytes, {nbytes} expected")
            if checksum != header.checksum:
                raise FrameError("payload checksum mismatch")
        except FrameError as exc:
            self._forget(key, delete=True)
            with self._mutex:
                self._stats.corrupt += 1
                self._stats.misses += 1
            self._warn.warning(
                "disk-corrupt", "disk tier: dropped bad chunk file %s: %s", path, exc
            )
            return False
        except OSError as exc:
            self._count_error("disk-read", "disk tier: read of %s failed: %s", path, exc)
            return False
        finally:
            os.close(fd.fd)
        with self._mutex:
            self._stats.hits += 1
            self._stats.hit_bytes += nbytes
        with contextlib.suppress(OSError):
            os.utime(path)  # keep the LRU order across restarts (mtime)
        return True

    def _read_buffered(
        self, fd: int, dsts: Sequence[torch.Tensor], nbytes: int
    ) -> tuple[FrameHeader, int]:
        head = os.pread(fd, DISK_HEADER_BYTES, 0)
        header = decode_header(head)
        if header.header_len != DISK_HEADER_BYTES or header.stored_len != nbytes:
            raise FrameError("unexpected header or length")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        hasher = xxhash.xxh3_64()
        offset = DISK_HEADER_BYTES
        for piece in _pieces(numpy_views(dsts)):  # hash each piece while it is hot
            filled = 0
            while filled < len(piece):
                got = os.preadv(fd, [piece[filled:]], offset)
                if got == 0:
                    raise FrameError(f"truncated file ({offset} of {header.frame_len} bytes)")
                filled += got
                offset += got
            hasher.update(piece)
        if os.pread(fd, 1, offset):
            raise FrameError("file longer than its header says")
        return header, int(hasher.intdigest())

    # ----- maintenance -----
    def _forget(self, key: ChunkKey, *, delete: bool) -> None:
        with self._mutex:
            nbytes = self._index.pop(key, None)
            if nbytes is not None:
                self._used -= file_bytes_for(nbytes)
                self._notify("evicted", key)
        if delete:
            _unlink_quiet(str(self.path_for(key)))

    def remove(self, key: ChunkKey) -> bool:
        with self._mutex:
            present = key in self._index
        if present:
            self._forget(key, delete=True)
        return present

    def _count_error(self, topic: str, message: str, *args: object) -> None:
        with self._mutex:
            self._stats.errors += 1
            self._stats.misses += 1
        self._warn.warning(topic, message, *args)

    def drop_page_cache(self, key: ChunkKey) -> None:
        """Ask the kernel to forget the cached pages of ``key``'s file (benchmarks, tests)."""
        try:
            fd = os.open(self.path_for(key), os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def stats(self) -> TierStats:
        with self._mutex:
            snapshot = TierStats(**self._stats.as_dict())  # type: ignore[arg-type]
            snapshot.entries = len(self._index)
            snapshot.used_bytes = self._charged()
        snapshot.available = self.available
        snapshot.state = "ok" if self.available else "disabled"
        snapshot.pending_tasks = self.pool.pending()
        return snapshot

    def indexed_keys(self) -> list[ChunkKey]:
        """The keys in the index, least recently used first."""
        with self._mutex:
            return list(self._index)

    def close(self) -> None:
        self.pool.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES) or not path.exists():
            raise
        # A read-only disk still serves what it holds; stores will be misses with a warning.
        log.warning("disk tier: %s is read-only: serving reads only", path.parent)
        return os.open(path, os.O_RDONLY)


def _key_from_name(name: str) -> ChunkKey | None:
    if not name.endswith(SUFFIX) or len(name) != 2 * KEY_BYTES + len(SUFFIX):
        return None
    try:
        return ChunkKey(bytes.fromhex(name[: 2 * KEY_BYTES]))
    except ValueError:
        return None


def _unlink_quiet(path: str) -> int:
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("disk tier: cannot delete %s: %s", path, exc)
        return 0


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _pieces(views: Sequence[memoryview]) -> Iterator[memoryview]:
    """The views cut into pieces of at most ``PIECE_BYTES`` (cache-sized, hashed while hot)."""
    for view in views:
        for start in range(0, len(view), PIECE_BYTES):
            yield view[start : start + PIECE_BYTES]
