"""Optional O_DIRECT file I/O through page-aligned bounce buffers.

O_DIRECT needs aligned buffer addresses, offsets and lengths. L1 pages are not guaranteed to
be block-aligned in memory, so chunks pass through a per-thread anonymous mmap (page-aligned)
of ``BOUNCE_BYTES``. Filesystems without O_DIRECT (tmpfs) fall back to buffered I/O with one
warning.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from lmcache_node.tiers.frame import DISK_HEADER_BYTES, FrameError, FrameHeader, decode_header

BLOCK = 4096
BOUNCE_BYTES = 16 * 1024**2
_O_DIRECT = getattr(os, "O_DIRECT", 0)


@dataclass(frozen=True)
class OpenFile:
    fd: int
    direct: bool


Opener = Callable[[Path, int, int], int]  # os.open(path, flags, mode)


class DirectIO:
    """O_DIRECT state of one tier: enabled, and the per-thread aligned buffers."""

    def __init__(self, enabled: bool, *, opener: Opener = os.open) -> None:
        self.opener = opener  # os.open; tests pass one that refuses O_DIRECT
        self.enabled = enabled and _O_DIRECT != 0
        self.requested = enabled
        self._local = threading.local()
        self._warned = False
        self._mutex = threading.Lock()

    def disable(self, path: Path, reason: str, logger: logging.Logger) -> None:
        with self._mutex:
            self.enabled = False
            if self._warned:
                return
            self._warned = True
        logger.warning(
            "use_odirect: O_DIRECT is not supported for %s (%s); using buffered I/O instead",
            path,
            reason,
        )

    def _bounce(self) -> torch.Tensor:
        buffer: torch.Tensor | None = getattr(self._local, "buffer", None)
        if buffer is None:
            region = mmap.mmap(-1, BOUNCE_BYTES)  # anonymous mappings are page-aligned
            self._local.region = region
            buffer = torch.frombuffer(region, dtype=torch.uint8)
            self._local.buffer = buffer
        return buffer

    def write_frame(
        self,
        fd: int,
        make_header: Callable[[int], bytes],
        srcs: Sequence[torch.Tensor],
        nbytes: int,
    ) -> None:
        """Write the payload from block 1 on with aligned writes, hashing each piece while it
        is hot in the bounce buffer; then the header (``make_header(checksum)``) at 0, and
        cut the file to its true length."""
        bounce = self._bounce()
        view = memoryview(bounce.numpy())  # type: ignore[arg-type]
        hasher = xxhash.xxh3_64()
        offset = DISK_HEADER_BYTES
        for piece in _pieces(list(srcs), BOUNCE_BYTES):
            filled = 0
            for part in piece:
                bounce[filled : filled + part.numel()].copy_(part)
                filled += part.numel()
            hasher.update(view[:filled])
            _pwrite_aligned(fd, bounce, view, filled, offset)
            offset += filled
        header = make_header(int(hasher.intdigest()))
        bounce[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        _pwrite_aligned(fd, bounce, view, len(header), 0)
        os.ftruncate(fd, DISK_HEADER_BYTES + nbytes)

    def read_frame(
        self, fd: int, dsts: Sequence[torch.Tensor], nbytes: int
    ) -> tuple[FrameHeader, int]:
        """Read a frame into ``dsts``; the header and the payload's xxh3-64."""
        bounce = self._bounce()
        view = memoryview(bounce.numpy())  # type: ignore[arg-type]
        cursor = _Cursor(dsts)
        hasher = xxhash.xxh3_64()
        total = DISK_HEADER_BYTES + nbytes
        offset = 0
        header: FrameHeader | None = None
        while offset < total:
            got = os.preadv(fd, [view], offset)
            if got == 0:
                raise FrameError(f"truncated file ({offset} of {total} bytes)")
            start = 0
            if header is None:
                header = decode_header(view[:DISK_HEADER_BYTES])
                if header.header_len != DISK_HEADER_BYTES or header.stored_len != nbytes:
                    raise FrameError("unexpected header or length")
                start = DISK_HEADER_BYTES
            end = min(got, total - offset)
            if end < got:
                raise FrameError("file longer than its header says")
            if end > start:
                hasher.update(view[start:end])
                cursor.write(bounce[start:end])
            offset += got
            if got % BLOCK and offset < total:
                raise FrameError(f"truncated file ({offset} of {total} bytes)")
        if header is None:
            raise FrameError("empty file")
        if os.pread(fd, 1, total):
            raise FrameError("file longer than its header says")
        return header, int(hasher.intdigest())


def _pwrite_aligned(
    fd: int, bounce: torch.Tensor, view: memoryview, filled: int, offset: int
) -> None:
    aligned = -(-filled // BLOCK) * BLOCK
    if aligned > filled:
        bounce[filled:aligned].zero_()
    done = 0
    while done < aligned:
        done += os.pwrite(fd, view[done:aligned], offset + done)


def open_direct(direct: DirectIO, path: Path, flags: int, logger: logging.Logger) -> OpenFile:
    """Open with O_DIRECT when enabled and supported, else buffered (one warning)."""
    if direct.enabled:
        try:
            return OpenFile(direct.opener(path, flags | _O_DIRECT, 0o644), True)
        except OSError as exc:
            if exc.errno != 22:  # EINVAL: the filesystem refuses O_DIRECT
                raise
            direct.disable(path, str(exc), logger)
    return OpenFile(direct.opener(path, flags, 0o644), False)


class _Cursor:
    """Writes consecutive byte runs into a list of flat uint8 destinations."""

    def __init__(self, dsts: Sequence[torch.Tensor]) -> None:
        self._dsts = dsts
        self._index = 0
        self._offset = 0

    def write(self, src: torch.Tensor) -> None:
        position = 0
        remaining = src.numel()
        while remaining:
            if self._index >= len(self._dsts):
                raise FrameError("payload larger than the destination")
            dst = self._dsts[self._index]
            step = min(dst.numel() - self._offset, remaining)
            dst[self._offset : self._offset + step].copy_(src[position : position + step])
            self._offset += step
            position += step
            remaining -= step
            if self._offset == dst.numel():
                self._index += 1
                self._offset = 0


def _pieces(sources: Sequence[torch.Tensor], size: int) -> Iterator[list[torch.Tensor]]:
    """Split the concatenation of ``sources`` into lists of slices of at most ``size`` bytes."""
    piece: list[torch.Tensor] = []
    room = size
    for src in sources:
        position = 0
        while position < src.numel():
            step = min(room, src.numel() - position)
            piece.append(src[position : position + step])
            position += step
            room -= step
            if room == 0:
                yield piece
                piece = []
                room = size
    if piece:
        yield piece
