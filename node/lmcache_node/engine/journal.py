"""The L1 pool's durable index: a header and one commit record per entry, in the pool itself.

Layout of a pool segment (little-endian)::

    [0, 4 KiB)        header: magic, layout version, geometry, key namespace, CRC-32
    [4 KiB, +64*N)    one 64-byte slot per page; the slot of an entry's first page holds
                      its record: commit word, CRC-32, sequence, length, page count, key
    [.., +4*N)        chain: for each page, the entry's next page (END after the last)
    [2 MiB-aligned)   the N data pages the engine's ``MemoryPool`` hands out

A record becomes valid only when its commit word is written, last, after the entry's bytes,
its chain and the rest of its record; removing an entry clears the commit word first, before
its pages can be handed out again. The index is written by the engine under its lock and read
only by the next server, after this one died (the pool's flock passes from the dead holder
to the next, which orders the reads after every write the holder made). So program order
alone decides what the next server finds, with no fence and no fsync (tmpfs): a process killed
at any instruction leaves each record either whole and committed, or without its commit
word. A torn field is caught by the record's CRC, a page claimed twice drops both claimants.
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from lmcache_node.keys import KEY_BYTES, ChunkKey

log = logging.getLogger(__name__)

MAGIC = b"LMCNPOOL"
LAYOUT_VERSION = 1
HEADER_BYTES = 4096
SLOT_BYTES = 64
DATA_ALIGN = 2 * 1024**2  # data pages start on a huge-page boundary
END = 0xFFFFFFFF  # chain terminator; also bounds the page count
COMMITTED = int.from_bytes(b"LMC1", "little")  # 4 distinct bytes: a torn write never equals it
NAMESPACE_BYTES = 64

# magic, version, header bytes, page size, pages, chunk size, slot bytes, slots, chain, data,
# total bytes, key namespace; then a CRC-32 of all of it
_HEADER = struct.Struct(f"<8sIIQQQQQQQQ{NAMESPACE_BYTES}s")
_CRC = struct.Struct("<I")
_COMMIT = struct.Struct("<I")  # slot offset 0, written last
_RECORD = struct.Struct(f"<QQII{KEY_BYTES}s")  # slot offset 8: seq, nbytes, pages, 0, key
_RECORD_AT = 8
_CRC_AT = 4


class IncompatiblePoolError(Exception):
    """A pool segment this server cannot adopt; the message says why."""


@dataclass(frozen=True)
class PoolGeometry:
    """What must match for a server to adopt a pool."""

    page_size: int
    num_pages: int
    chunk_size: int
    namespace: str  # the key scheme (keys.HASH_ALGORITHM)

    def __post_init__(self) -> None:
        if self.page_size <= 0 or not 0 < self.num_pages < END:
            raise ValueError(f"a pool needs 1 to {END - 1} pages of a positive size")
        if len(self.namespace.encode()) > NAMESPACE_BYTES:
            raise ValueError(f"key namespace longer than {NAMESPACE_BYTES} bytes")

    @property
    def slots_offset(self) -> int:
        return HEADER_BYTES

    @property
    def chain_offset(self) -> int:
        return self.slots_offset + SLOT_BYTES * self.num_pages

    @property
    def data_offset(self) -> int:
        end = self.chain_offset + 4 * self.num_pages
        return -(-end // DATA_ALIGN) * DATA_ALIGN

    @property
    def data_bytes(self) -> int:
        return self.page_size * self.num_pages

    @property
    def total_bytes(self) -> int:
        return self.data_offset + self.data_bytes

    def header(self) -> bytes:
        """The header block (HEADER_BYTES long)."""
        fields = _HEADER.pack(
            MAGIC, LAYOUT_VERSION, HEADER_BYTES, self.page_size, self.num_pages,
            self.chunk_size, SLOT_BYTES, self.slots_offset, self.chain_offset,
            self.data_offset, self.total_bytes, self.namespace.encode(),
        )  # fmt: skip
        block = fields + _CRC.pack(zlib.crc32(fields))
        return block + bytes(HEADER_BYTES - len(block))

    def mismatch(self, found: PoolGeometry) -> str | None:
        """Why a pool of geometry ``found`` cannot serve this one; None when it can."""
        for name, label in (
            ("chunk_size", "chunk size"),
            ("page_size", "page size (l1_page_size)"),
            ("num_pages", "page count (max_local_cpu_size)"),
            ("namespace", "key namespace"),
        ):
            theirs, ours = getattr(found, name), getattr(self, name)
            if theirs != ours:
                return f"its {label} is {theirs}, this server's is {ours}"
        return None


def foreign_header(block: bytes) -> str | None:
    """Why a file starting with ``block`` is not a pool of ours (of any layout version);
    None when it is, or when its header was never written (a start that did not finish)."""
    start = block[: len(MAGIC)]
    if any(start) and start != MAGIC:
        return "it does not start with the pool's magic"
    return None


def read_header(block: bytes) -> PoolGeometry:
    """The geometry a header block describes; IncompatiblePoolError saying why it is unusable."""
    if len(block) < _HEADER.size + _CRC.size or not any(block[: len(MAGIC)]):
        raise IncompatiblePoolError("it has no header (a start that did not finish)")
    if block[: len(MAGIC)] != MAGIC:
        raise IncompatiblePoolError("it is not an lmcache-node L1 pool (unknown magic)")
    (version,) = struct.unpack_from("<I", block, len(MAGIC))
    if version != LAYOUT_VERSION:
        raise IncompatiblePoolError(
            f"its layout version is {version}, this server's is {LAYOUT_VERSION}"
        )
    fields = block[: _HEADER.size]
    (crc,) = _CRC.unpack_from(block, _HEADER.size)
    if zlib.crc32(fields) != crc:
        raise IncompatiblePoolError("its header is damaged (checksum mismatch)")
    _, _, header_bytes, page, pages, chunk, slot, _, _, _, total, ns = _HEADER.unpack(fields)
    try:
        geometry = PoolGeometry(page, pages, chunk, ns.rstrip(b"\0").decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise IncompatiblePoolError(f"its header is invalid ({exc})") from None
    if header_bytes != HEADER_BYTES or slot != SLOT_BYTES or total != geometry.total_bytes:
        raise IncompatiblePoolError("its header describes another layout")
    return geometry


class JournalEntry(NamedTuple):
    """A committed entry found in a pool."""

    key: ChunkKey
    pages: list[int]
    nbytes: int
    seq: int


@dataclass
class ScanResult:
    entries: list[JournalEntry]  # oldest commit first
    dropped: int  # committed-looking records that failed a check (cleared)


class PoolJournal:
    """Reads and writes the index part of a pool mapping (``region``: its first
    ``geometry.data_offset`` bytes). ``owner`` is kept alive with the journal: the open pool
    file whose lock says the pool is in use."""

    def __init__(
        self, region: torch.Tensor, geometry: PoolGeometry, owner: object | None = None
    ) -> None:
        if region.dtype != torch.uint8 or region.numel() < geometry.data_offset:
            raise ValueError("the journal region must be the pool's first data_offset bytes")
        self.geometry = geometry
        self.owner = owner
        array = region[: geometry.data_offset].numpy()
        self._view = memoryview(array)  # type: ignore[arg-type]
        pages = geometry.num_pages
        self._commits = np.ndarray(
            (pages,), "<u4", array, geometry.slots_offset, (SLOT_BYTES,)
        )  # fmt: skip
        self._chain = np.ndarray((pages,), "<u4", array, geometry.chain_offset)
        self._seq = 0

    # ----- creation -----
    def format(self) -> None:
        """Write the header of a fresh (all-zero) pool: the last step of creating it."""
        self._view[:HEADER_BYTES] = self.geometry.header()

    # ----- the store path (called under the engine's lock) -----
    def committed(self, key: ChunkKey, pages: Sequence[int], nbytes: int) -> None:
        """Record a committed entry: chain, record, then the commit word."""
        if len(key) != KEY_BYTES:
            return  # not a chunk key of ours: kept in memory only
        count = len(pages)
        view = self._view
        # the chain: each page names the next (END after the last), one write per run
        following = _chain_bytes(pages)
        chain_at = self.geometry.chain_offset
        start = 0
        for index in range(1, count + 1):
            if index == count or pages[index] != pages[index - 1] + 1:
                first = chain_at + 4 * pages[start]
                view[first : first + 4 * (index - start)] = following[4 * start : 4 * index]
                start = index
        self._seq += 1
        offset = self.geometry.slots_offset + SLOT_BYTES * pages[0]
        record = _RECORD.pack(self._seq, nbytes, count, 0, key)
        crc = zlib.crc32(record + following)  # with the head (the slot), names every page
        view[offset + _RECORD_AT : offset + _RECORD_AT + _RECORD.size] = record
        _CRC.pack_into(self._view, offset + _CRC_AT, crc)
        _COMMIT.pack_into(self._view, offset, COMMITTED)

    def removed(self, pages: Sequence[int]) -> None:
        """Withdraw an entry's record; call before its pages can be handed out again."""
        _COMMIT.pack_into(self._view, self.geometry.slots_offset + SLOT_BYTES * pages[0], 0)

    # ----- adoption -----
    def scan(self) -> ScanResult:
        """The committed entries, checked: CRC, a chain of exactly the pages the length
        needs, no page claimed twice. Records that fail are cleared and counted."""
        geometry = self.geometry
        found: list[JournalEntry] = []
        bad: list[int] = []
        for head in np.flatnonzero(self._commits == COMMITTED).tolist():
            entry = self._read(head)
            if entry is None:
                bad.append(head)
            else:
                found.append(entry)
        owners = np.zeros(geometry.num_pages, dtype=np.int32)
        for entry in found:
            owners[entry.pages] += 1
        entries = [e for e in found if owners[e.pages].max() == 1]
        bad.extend(e.pages[0] for e in found if owners[e.pages].max() > 1)
        for head in bad:
            self.removed([head])
        if bad:
            log.warning("L1 pool: dropped %d damaged or conflicting record(s)", len(bad))
        entries.sort(key=lambda e: e.seq)
        self._seq = max((e.seq for e in entries), default=0)
        return ScanResult(entries, len(bad))

    def _read(self, head: int) -> JournalEntry | None:
        geometry = self.geometry
        offset = geometry.slots_offset + SLOT_BYTES * head + _RECORD_AT
        (crc,) = _CRC.unpack_from(self._view, offset - _RECORD_AT + _CRC_AT)
        record = bytes(self._view[offset : offset + _RECORD.size])
        seq, nbytes, count, _, key = _RECORD.unpack(record)
        if count != max(1, -(-nbytes // geometry.page_size)) or count > geometry.num_pages:
            return None
        pages = [head]
        for _ in range(count - 1):
            following = int(self._chain[pages[-1]])
            if following >= geometry.num_pages:
                return None
            pages.append(following)
        if int(self._chain[pages[-1]]) != END or len(set(pages)) != count:
            return None
        if zlib.crc32(record + _chain_bytes(pages)) != crc:
            return None
        return JournalEntry(ChunkKey(key), pages, nbytes, seq)


def _chain_bytes(pages: Sequence[int]) -> bytes:
    """The chain entries of ``pages``: each names the next, END after the last."""
    return struct.pack(f"<{len(pages)}I", *pages[1:], END)
