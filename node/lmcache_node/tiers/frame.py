"""The framed chunk: one self-checking layout for disk files and remote values.

A frame is a fixed header followed by the stored payload. The header carries a magic, the
format version, the codec, the key, a layout tag, the stored and decoded lengths, an xxh3-64
checksum of the stored payload and a checksum of the header itself. On disk the header is
padded to 4096 bytes so the payload starts block-aligned (O_DIRECT); remotely it is not padded
(and the remote tier appends a MAC, see ``remote_values``). Decompression never produces more
than the header's decoded length: a small value that would expand beyond it is refused.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import lz4.frame
import xxhash
import zstandard

from lmcache_node.keys import KEY_BYTES, ChunkKey

MAGIC = b"LMCK"
FORMAT_VERSION = 1
DEFAULT_LAYOUT = "bytes-v1"
LAYOUT_BYTES = 32
_BODY = struct.Struct("<4sHBBI16sQQQ32s")
_CHECK = struct.Struct("<Q")
HEADER_BYTES = _BODY.size + _CHECK.size  # the smallest header (remote values)
DISK_HEADER_BYTES = 4096  # disk files: payload starts on a block boundary


class TierError(Exception):
    """Root of the tiers' own errors."""


class FrameError(TierError):
    """A frame is missing, truncated, of another format, or fails its checksum."""


class WrongKeyError(FrameError):
    """The frame is intact but holds another chunk key than the one asked for."""


class DecompressionLimitError(FrameError):
    """The payload would decompress to more bytes than the chunk holds (a bomb)."""


class Codec(enum.IntEnum):
    """How the payload is stored: ``remote_serde`` names them."""

    NAIVE = 0
    ZSTD = 1
    LZ4 = 2

    @classmethod
    def from_serde(cls, name: str) -> Codec:
        try:
            return cls[name.upper()]
        except KeyError:
            allowed = ", ".join(c.name.lower() for c in cls)
            raise ValueError(f"unknown remote_serde {name!r}: use one of {allowed}") from None


@dataclass(frozen=True)
class FrameHeader:
    key: ChunkKey
    codec: Codec
    header_len: int
    stored_len: int
    raw_len: int
    checksum: int
    layout: str
    version: int = FORMAT_VERSION

    @property
    def frame_len(self) -> int:
        return self.header_len + self.stored_len


def payload_checksum(buffers: Iterable[Any]) -> int:
    """xxh3-64 over the concatenated buffers (anything with the buffer protocol)."""
    hasher = xxhash.xxh3_64()
    for buffer in buffers:
        hasher.update(buffer)
    return int(hasher.intdigest())


def encode_header(header: FrameHeader) -> bytes:
    if header.header_len < HEADER_BYTES:
        raise ValueError(f"header_len must be at least {HEADER_BYTES}")
    layout = header.layout.encode()
    if len(layout) > LAYOUT_BYTES:
        raise ValueError(f"layout tag longer than {LAYOUT_BYTES} bytes: {header.layout!r}")
    body = _BODY.pack(
        MAGIC,
        header.version,
        int(header.codec),
        0,
        header.header_len,
        bytes(header.key),
        header.stored_len,
        header.raw_len,
        header.checksum,
        layout,
    )
    packed = body + _CHECK.pack(xxhash.xxh3_64_intdigest(body))
    return packed + bytes(header.header_len - len(packed))


def decode_header(data: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse and check a header; raises FrameError with the reason."""
    if len(data) < HEADER_BYTES:
        raise FrameError(f"truncated header ({len(data)} of {HEADER_BYTES} bytes)")
    body = bytes(data[: _BODY.size])
    (check,) = _CHECK.unpack_from(data, _BODY.size)
    magic, version, codec, _flags, header_len, key, stored, raw, checksum, layout = _BODY.unpack(
        body
    )
    if magic != MAGIC:
        raise FrameError("not a chunk frame (bad magic)")
    if xxhash.xxh3_64_intdigest(body) != check:
        raise FrameError("header checksum mismatch")
    if version != FORMAT_VERSION:
        raise FrameError(f"frame format version {version}, this node reads {FORMAT_VERSION}")
    try:
        codec_value = Codec(codec)
    except ValueError:
        raise FrameError(f"unknown codec {codec}") from None
    if header_len < HEADER_BYTES or len(key) != KEY_BYTES:
        raise FrameError("malformed header")
    return FrameHeader(
        key=ChunkKey(key),
        codec=codec_value,
        header_len=header_len,
        stored_len=stored,
        raw_len=raw,
        checksum=checksum,
        layout=layout.rstrip(b"\0").decode(errors="replace"),
        version=version,
    )


def check_header(header: FrameHeader, key: ChunkKey, layout: str) -> None:
    """The header must name the key asked for and the layout this node writes."""
    if header.key != key:
        raise WrongKeyError("frame holds another key")
    if header.layout != layout:
        raise FrameError(f"frame layout {header.layout!r}, expected {layout!r}")


def encode_payload(codec: Codec, raw: bytes | memoryview) -> bytes | memoryview:
    if codec is Codec.NAIVE:
        return raw
    if codec is Codec.ZSTD:
        return bytes(zstandard.ZstdCompressor(level=1).compress(raw))
    return bytes(lz4.frame.compress(raw))


def decode_payload(codec: Codec, stored: bytes | memoryview, raw_len: int) -> bytes | memoryview:
    """The raw payload; raises FrameError when it does not decode to exactly ``raw_len`` bytes.

    Compressed payloads are decoded with a hard cap of ``raw_len + 1`` output bytes, whatever
    sizes the compressed stream itself claims: ``DecompressionLimitError`` when it would give
    more.
    """
    try:
        if codec is Codec.NAIVE:
            raw: bytes | memoryview = stored
        elif codec is Codec.ZSTD:
            raw = _zstd_capped(stored, raw_len)
        else:
            raw = _lz4_capped(stored, raw_len)
    except (zstandard.ZstdError, RuntimeError, ValueError) as exc:
        raise FrameError(f"payload does not decode ({codec.name.lower()}): {exc}") from None
    if len(raw) > raw_len:
        raise DecompressionLimitError(
            f"payload decodes to more than the {raw_len} bytes the chunk holds"
        )
    if len(raw) != raw_len:
        raise FrameError(f"payload decodes to {len(raw)} bytes, header says {raw_len}")
    return raw


def _zstd_capped(stored: bytes | memoryview, cap: int) -> bytes:
    """At most ``cap + 1`` bytes of the zstd stream (``decompress(max_output_size=)`` trusts
    the frame's own content size, so it is no cap). Frames that follow the first are read
    too, as zstd defines a stream: what they add counts against the cap (it was ignored)."""
    reader = zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=True)
    parts: list[bytes] = []
    total = 0
    while total <= cap:
        part = reader.read(cap + 1 - total)
        if not part:
            break
        parts.append(part)
        total += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _lz4_capped(stored: bytes | memoryview, cap: int) -> bytes:
    """At most ``cap + 1`` bytes of one whole lz4 frame; trailing bytes are an error."""
    decompressor = lz4.frame.LZ4FrameDecompressor()
    raw = decompressor.decompress(stored, max_length=cap + 1)
    if len(raw) <= cap and not decompressor.eof:
        raise FrameError("lz4 payload is truncated")
    if decompressor.unused_data:
        raise FrameError("bytes after the end of the lz4 payload")
    return bytes(raw)


def build_frame(
    key: ChunkKey,
    raw: bytes | memoryview | Sequence[Any],
    codec: Codec,
    layout: str = DEFAULT_LAYOUT,
    *,
    trailer_bytes: int = 0,
) -> memoryview:
    """A whole frame (header + encoded payload) in one buffer, for remote values.

    ``raw`` is the payload, or a list of buffers whose concatenation is the payload; with no
    compression they are copied once, straight into the frame. ``trailer_bytes`` zero bytes
    follow the frame in the same buffer (room for the remote tier's MAC, without a copy).
    """
    parts: list[Any] = [raw] if isinstance(raw, (bytes, memoryview)) else list(raw)
    raw_len = sum(memoryview(p).nbytes for p in parts)
    if codec is not Codec.NAIVE:
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        parts = [encode_payload(codec, joined)]
    payload_len = sum(memoryview(p).nbytes for p in parts)
    frame = bytearray(HEADER_BYTES + payload_len + trailer_bytes)
    position = HEADER_BYTES
    for part in parts:
        view = memoryview(part).cast("B")
        frame[position : position + view.nbytes] = view
        position += view.nbytes
    payload = memoryview(frame)[HEADER_BYTES : HEADER_BYTES + payload_len]
    header = FrameHeader(
        key=key,
        codec=codec,
        header_len=HEADER_BYTES,
        stored_len=payload_len,
        raw_len=raw_len,
        checksum=payload_checksum([payload]),
        layout=layout,
    )
    frame[:HEADER_BYTES] = encode_header(header)
    return memoryview(frame)


def parse_frame(
    frame: bytes | memoryview,
    key: ChunkKey,
    layout: str = DEFAULT_LAYOUT,
    *,
    raw_len: int | None = None,
) -> bytes | memoryview:
    """The raw payload of a whole frame; FrameError if anything does not check out.

    ``raw_len``: the chunk's expected size; a frame of another size is refused before its
    payload is decoded.
    """
    header = decode_header(frame)
    check_header(header, key, layout)
    if raw_len is not None and header.raw_len != raw_len:
        raise FrameError(f"frame holds {header.raw_len} bytes, {raw_len} expected")
    if len(frame) != header.frame_len:
        raise FrameError(f"frame is {len(frame)} bytes, header says {header.frame_len}")
    stored = memoryview(frame)[header.header_len :]
    if payload_checksum([stored]) != header.checksum:
        raise FrameError("payload checksum mismatch")
    return decode_payload(header.codec, stored, header.raw_len)
