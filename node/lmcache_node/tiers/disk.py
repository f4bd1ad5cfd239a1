"""The local disk tier (L2): one framed file per chunk, crash safe, capped, restart-recoverable.

Write: reserve space (evicting least recently used files), write a unique temporary file,
fsync, rename over the final name, then publish in the index. Read: open, check the header,
read into the caller's buffers, check the payload checksum; anything that does not check out is
a miss and the file is deleted. Start-up: rebuild the index from the directory (temporary files
removed), least recently used first by mtime. One process owns a directory (flock).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lmcache_node.keys import ChunkKey
from lmcache_node.tiers.base import RateLimitedLog, TierStats
from lmcache_node.tiers.directio import DirectIO, open_direct
from lmcache_node.tiers.disk_files import (
    FULL_ERRNOS,
    chunk_path,
    file_bytes_for,
    lock_directory,
    read_buffered,
    scan_directory,
    temp_path,
    unlink_quiet,
    write_chunk_file,
)
from lmcache_node.tiers.frame import DEFAULT_LAYOUT, FrameError, check_header
from lmcache_node.tiers.workers import TaskPool

log = logging.getLogger(__name__)

__all__ = ["DiskTier", "KeyListener", "file_bytes_for"]

# (event, key) with event "stored" or "evicted"; called under the tier's lock: be quick
KeyListener = Callable[[str, ChunkKey], None]


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
        direct_io: DirectIO | None = None,
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
        self.direct = direct_io or DirectIO(use_odirect)
        self.rebuild_seconds = 0.0
        self.available = self._open(lock_wait_secs)

    # ----- start-up -----
    def _open(self, lock_wait_secs: float) -> bool:
        fd = lock_directory(self.root, lock_wait_secs)
        if fd is None:
            return False
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
        found, removed = scan_directory(self.root)
        for file in found:
            self._index[file.key] = file.nbytes
            self._used += file_bytes_for(file.nbytes)
        if removed:
            log.info("disk tier: removed %d temporary or truncated file(s) at start-up", removed)
        over = self._pick_victims_locked(0)
        for path, _size in over:
            unlink_quiet(str(path))
        self._deleting = 0

    # ----- paths -----
    def path_for(self, key: ChunkKey) -> Path:
        return chunk_path(self.root, key)

    def _temp_path(self, key: ChunkKey) -> Path:
        return temp_path(self.root, key, next(self._temp_ids))

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
            unlink_quiet(str(path))
            self._deleting -= size

    def _delete_files(self, victims: list[tuple[Path, int]]) -> None:
        for path, size in victims:
            unlink_quiet(str(path))
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
            unlink_quiet(str(temp))
            with self._mutex:
                self._reserved -= size
                self._writing.discard(key)
                self._stats.errors += 1
                self._stats.dropped_stores += 1
            if exc.errno in FULL_ERRNOS:
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
        write_chunk_file(self.direct, temp, key, srcs, nbytes, layout=self.layout)

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
                header, checksum = read_buffered(fd.fd, dsts, nbytes)
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

    # ----- maintenance -----
    def _forget(self, key: ChunkKey, *, delete: bool) -> None:
        with self._mutex:
            nbytes = self._index.pop(key, None)
            if nbytes is not None:
                self._used -= file_bytes_for(nbytes)
                self._notify("evicted", key)
        if delete:
            unlink_quiet(str(self.path_for(key)))

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
