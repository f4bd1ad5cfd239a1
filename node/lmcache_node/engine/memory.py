"""The L1 memory pool: one buffer allocated once, carved into fixed-size pages.

An entry owns a list of pages (usually contiguous); bytes are streamed into and out of it
with ``copy_stream`` so the hot path never allocates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from lmcache_node.sizes import format_bytes
from lmcache_node.transfer.streams import as_bytes, copy_stream

log = logging.getLogger(__name__)

__all__ = ["MemoryPool", "PageSpan", "as_bytes", "copy_stream"]


class MemoryPool:
    """A preallocated byte buffer split into ``page_size`` pages (pinned when CUDA is present)."""

    def __init__(
        self,
        capacity_bytes: int,
        page_size: int,
        *,
        pin_memory: bool | None = None,
        backing: torch.Tensor | None = None,
        prefault: bool = True,
    ) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.page_size = page_size
        self.num_pages = capacity_bytes // page_size
        size = self.num_pages * page_size
        if backing is not None:
            if backing.dtype != torch.uint8 or backing.numel() < size:
                raise ValueError("backing must be a uint8 tensor of at least capacity bytes")
            self.buffer = backing[:size]
        else:
            pin = torch.cuda.is_available() if pin_memory is None else pin_memory
            self.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin and size > 0)
            if prefault:  # take the memory now, not as page faults on the hot path
                self.buffer.zero_()
        self.pinned = bool(size) and self.buffer.is_pinned()
        # A stack popped from the end: fresh pools hand out ascending, contiguous pages.
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))
        log.debug(
            "L1 pool: %s in %d pages of %s (pinned=%s)",
            format_bytes(size),
            self.num_pages,
            format_bytes(page_size),
            self.pinned,
        )

    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.page_size))

    def alloc(self, npages: int) -> list[int] | None:
        """Take ``npages`` pages, or None when fewer are free. Not thread-safe: callers lock."""
        if npages > len(self._free):
            return None
        taken = self._free[-npages:]
        del self._free[-npages:]
        taken.reverse()
        return taken

    def claim(self, pages: Iterable[int]) -> None:
        """Take these specific pages out of the free list (adopting a pool's entries)."""
        taken = set(pages)
        self._free = [page for page in self._free if page not in taken]

    def release(self, pages: Sequence[int]) -> None:
        self._free.extend(reversed(pages))

    def span(self, pages: list[int], nbytes: int) -> PageSpan:
        return PageSpan(self, pages, nbytes)


@dataclass(eq=False)
class PageSpan:
    """The bytes of one entry: ``nbytes`` spread over ``pages`` of a pool."""

    pool: MemoryPool
    pages: list[int]
    nbytes: int
    _segments: list[torch.Tensor] | None = field(default=None, repr=False)

    def segments(self) -> list[torch.Tensor]:
        """Flat uint8 views covering exactly ``nbytes``; contiguous pages are merged."""
        if self._segments is None:
            size = self.pool.page_size
            runs: list[tuple[int, int]] = []
            for page in self.pages:
                if runs and runs[-1][0] + runs[-1][1] == page:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                else:
                    runs.append((page, 1))
            views: list[torch.Tensor] = []
            left = self.nbytes
            for start, count in runs:
                length = min(count * size, left)
                views.append(self.pool.buffer[start * size : start * size + length])
                left -= length
            self._segments = views
        return self._segments

    def write(self, srcs: Iterable[torch.Tensor]) -> int:
        """Stream flat uint8 sources into this span."""
        return copy_stream(self.segments(), srcs)

    def read_into(self, dsts: Sequence[torch.Tensor]) -> int:
        """Stream this span into flat uint8 destinations."""
        return copy_stream(dsts, self.segments())

    def to_bytes(self) -> bytes:
        return b"".join(bytes(seg.numpy()) for seg in self.segments())
