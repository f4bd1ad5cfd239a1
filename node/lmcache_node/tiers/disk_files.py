"""The disk tier's files: names, the directory lock, writing and reading one chunk file.

A chunk file is ``<root>/<2 hex>/<key hex>.lmc``: a frame header (``frame.py``, codec naive)
then the payload. It is written to a unique temporary name (header last, at offset 0, once
the payload's checksum is known), fsynced and renamed by the tier (``disk.py``), which also
keeps the index, the cap and the LRU order.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from lmcache_node.keys import KEY_BYTES, ChunkKey
from lmcache_node.tiers.base import numpy_views
from lmcache_node.tiers.directio import DirectIO, open_direct
from lmcache_node.tiers.frame import (
    DISK_HEADER_BYTES,
    Codec,
    FrameError,
    FrameHeader,
    decode_header,
    encode_header,
)

log = logging.getLogger(__name__)

SUFFIX = ".lmc"
TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".lmcache-disk.lock"
BLOCK = 4096
PIECE_BYTES = 2 * 1024**2
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def file_bytes_for(nbytes: int) -> int:
    """Space charged against the cap for a chunk of ``nbytes`` (header + payload, in blocks)."""
    return -(-(DISK_HEADER_BYTES + nbytes) // BLOCK) * BLOCK


def chunk_path(root: Path, key: ChunkKey) -> Path:
    name = key.hex()
    return root / name[:2] / (name + SUFFIX)


def temp_path(root: Path, key: ChunkKey, unique: int) -> Path:
    name = key.hex()
    return root / name[:2] / f".{name}.{os.getpid()}.{unique}{TEMP_SUFFIX}"


def lock_directory(root: Path, wait_secs: float) -> int | None:
    """Create ``root`` and take its flock (one process per directory); the lock's descriptor,
    or None (logged) when the directory cannot be used or another process keeps it."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = _open_lock_file(root / LOCK_NAME)
    except OSError as exc:
        log.error(
            "disk tier disabled: cannot use %s (%s); check local_disk and that the "
            "directory is writable",
            root,
            exc,
        )
        return None
    deadline = time.monotonic() + wait_secs
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                log.error(
                    "disk tier disabled: another process holds %s; give each cache "
                    "server its own local_disk directory",
                    root / LOCK_NAME,
                )
                return None
            time.sleep(0.1)


@dataclass(frozen=True)
class FoundFile:
    mtime: float
    key: ChunkKey
    nbytes: int  # payload bytes


def scan_directory(root: Path) -> tuple[list[FoundFile], int]:
    """The chunk files under ``root``, oldest first, and how many temporary or truncated
    files were removed on the way."""
    found: list[FoundFile] = []
    removed = 0
    for shard in os.scandir(root):
        if not shard.is_dir(follow_symlinks=False) or len(shard.name) != 2:
            continue
        for item in os.scandir(shard.path):
            name = item.name
            if name.endswith(TEMP_SUFFIX):
                removed += unlink_quiet(item.path)
                continue
            key = key_from_name(name)
            if key is None:
                continue
            try:
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if info.st_size < DISK_HEADER_BYTES:
                removed += unlink_quiet(item.path)
                continue
            found.append(FoundFile(info.st_mtime, key, info.st_size - DISK_HEADER_BYTES))
    found.sort(key=lambda row: row.mtime)
    return found, removed


def chunk_header(key: ChunkKey, nbytes: int, checksum: int, layout: str) -> bytes:
    return encode_header(
        FrameHeader(
            key=key,
            codec=Codec.NAIVE,
            header_len=DISK_HEADER_BYTES,
            stored_len=nbytes,
            raw_len=nbytes,
            checksum=checksum,
            layout=layout,
        )
    )


def write_chunk_file(
    direct: DirectIO,
    temp: Path,
    key: ChunkKey,
    srcs: Sequence[torch.Tensor],
    nbytes: int,
    *,
    layout: str,
) -> None:
    """Write and fsync the chunk file at ``temp`` (created, never overwritten)."""
    temp.parent.mkdir(exist_ok=True)
    fd = open_direct(direct, temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, log)
    try:
        if fd.direct:
            make_header = functools.partial(chunk_header, key, nbytes, layout=layout)
            direct.write_frame(fd.fd, make_header, srcs, nbytes)
        else:
            # One pass over the source: hash each piece while it is hot, write it; the
            # header (with the checksum) goes in last, at offset 0.
            hasher = xxhash.xxh3_64()
            offset = DISK_HEADER_BYTES
            for piece in _pieces(numpy_views(srcs)):
                hasher.update(piece)
                _pwrite_all(fd.fd, piece, offset)
                offset += len(piece)
            header = chunk_header(key, nbytes, int(hasher.intdigest()), layout)
            _pwrite_all(fd.fd, memoryview(header), 0)
        os.fsync(fd.fd)
    finally:
        os.close(fd.fd)


def read_buffered(fd: int, dsts: Sequence[torch.Tensor], nbytes: int) -> tuple[FrameHeader, int]:
    """Read a chunk file into ``dsts``: its header and the payload's checksum (unchecked)."""
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


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES) or not path.exists():
            raise
        # A read-only disk still serves what it holds; stores will be misses with a warning.
        log.warning("disk tier: %s is read-only: serving reads only", path.parent)
        return os.open(path, os.O_RDONLY)


def key_from_name(name: str) -> ChunkKey | None:
    if not name.endswith(SUFFIX) or len(name) != 2 * KEY_BYTES + len(SUFFIX):
        return None
    try:
        return ChunkKey(bytes.fromhex(name[: 2 * KEY_BYTES]))
    except ValueError:
        return None


def unlink_quiet(path: str) -> int:
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
