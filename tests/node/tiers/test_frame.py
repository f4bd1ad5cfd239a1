"""The chunk frame: round trips, and every kind of damage is detected."""

import os

import pytest
from lmcache_node.keys import ChunkKey
from lmcache_node.tiers.frame import (
    DISK_HEADER_BYTES,
    HEADER_BYTES,
    Codec,
    DecompressionLimitError,
    FrameError,
    FrameHeader,
    WrongKeyError,
    build_frame,
    decode_header,
    decode_payload,
    encode_header,
    encode_payload,
    parse_frame,
)

KEY = ChunkKey(bytes(range(16)))
OTHER = ChunkKey(bytes(range(1, 17)))


@pytest.mark.parametrize("codec", list(Codec))
def test_round_trip_every_codec(codec: Codec) -> None:
    raw = os.urandom(1000) + bytes(50_000)  # compressible tail
    frame = build_frame(KEY, raw, codec)
    assert bytes(parse_frame(frame, KEY)) == raw
    if codec is not Codec.NAIVE:
        assert len(frame) < len(raw)


def test_header_padding_and_fields() -> None:
    header = FrameHeader(KEY, Codec.NAIVE, DISK_HEADER_BYTES, 10, 10, 123, "bytes-v1")
    encoded = encode_header(header)
    assert len(encoded) == DISK_HEADER_BYTES
    assert decode_header(encoded) == header


@pytest.mark.parametrize("position", [0, 5, 20, HEADER_BYTES - 1, HEADER_BYTES + 3, -1])
def test_any_flipped_byte_is_detected(position: int) -> None:
    frame = bytearray(build_frame(KEY, os.urandom(4096), Codec.NAIVE))
    frame[position] ^= 0x40
    with pytest.raises(FrameError):
        parse_frame(bytes(frame), KEY)


@pytest.mark.parametrize("cut", [0, 10, HEADER_BYTES, HEADER_BYTES + 100])
def test_truncated_frame_is_detected(cut: int) -> None:
    frame = build_frame(KEY, os.urandom(4096), Codec.NAIVE)
    with pytest.raises(FrameError):
        parse_frame(frame[:cut], KEY)


def test_extra_bytes_are_detected() -> None:
    frame = build_frame(KEY, os.urandom(100), Codec.LZ4)
    with pytest.raises(FrameError, match="header says"):
        parse_frame(bytes(frame) + b"x", KEY)


def test_wrong_key_and_layout_are_misses() -> None:
    frame = build_frame(KEY, b"abc", Codec.NAIVE)
    with pytest.raises(WrongKeyError, match="another key"):
        parse_frame(frame, OTHER)
    with pytest.raises(FrameError, match="layout"):
        parse_frame(frame, KEY, layout="bytes-v2")


def test_other_format_version_is_refused() -> None:
    header = FrameHeader(KEY, Codec.NAIVE, HEADER_BYTES, 3, 3, 0, "bytes-v1", version=99)
    with pytest.raises(FrameError, match="version 99"):
        decode_header(encode_header(header))


def test_garbage_is_refused() -> None:
    with pytest.raises(FrameError, match="magic"):
        parse_frame(b"hello world" * 20, KEY)


def test_serde_names() -> None:
    assert Codec.from_serde("zstd") is Codec.ZSTD
    with pytest.raises(ValueError, match="naive, zstd, lz4"):
        Codec.from_serde("cachegen")


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.LZ4])
def test_decompression_is_capped_at_the_decoded_length(codec: Codec) -> None:
    raw = bytes(4096) + os.urandom(100)
    stored = bytes(encode_payload(codec, raw))
    assert bytes(decode_payload(codec, stored, len(raw))) == raw
    with pytest.raises(DecompressionLimitError):
        decode_payload(codec, stored, len(raw) - 1)  # one byte more than allowed
    with pytest.raises(DecompressionLimitError):
        decode_payload(codec, bytes(encode_payload(codec, bytes(64 * 1024**2))), 4096)
    with pytest.raises(FrameError):
        decode_payload(codec, stored, len(raw) + 1)  # too short is no bomb, still refused
    with pytest.raises(FrameError):
        decode_payload(codec, stored[:-8], len(raw))  # truncated stream
    with pytest.raises(FrameError):
        decode_payload(codec, stored + b"tail", len(raw))  # bytes after the stream


def test_frame_with_trailer_room() -> None:
    frame = build_frame(KEY, b"abc" * 10, Codec.NAIVE, trailer_bytes=32)
    assert bytes(frame[-32:]) == bytes(32)
    assert bytes(parse_frame(frame[:-32], KEY, raw_len=30)) == b"abc" * 10
    with pytest.raises(FrameError, match="30 bytes, 31 expected"):
        parse_frame(frame[:-32], KEY, raw_len=31)


@pytest.mark.parametrize("codec", list(Codec))
def test_a_payload_in_parts_is_their_concatenation(codec: Codec) -> None:
    """The remote tier hands the chunk's layers as separate buffers: the frame holds them in
    order, copied once (naive) or joined then compressed."""
    parts = [os.urandom(300), memoryview(bytearray(os.urandom(700))), bytes(5000), b"\x80\xff"]
    whole = b"".join(bytes(p) for p in parts)
    frame = build_frame(KEY, parts, codec, trailer_bytes=8)
    header = decode_header(frame)
    assert header.raw_len == len(whole)
    assert bytes(parse_frame(frame[:-8], KEY, raw_len=len(whole))) == whole
    if codec is Codec.NAIVE:
        assert bytes(frame[HEADER_BYTES : HEADER_BYTES + len(whole)]) == whole
    single = build_frame(KEY, [parts[0]], codec)
    assert bytes(parse_frame(single, KEY)) == parts[0]


def test_decode_errors_say_what_went_wrong() -> None:
    raw = os.urandom(100) + bytes(4000)
    lz4_stored = bytes(encode_payload(Codec.LZ4, raw))
    with pytest.raises(FrameError, match=r"^lz4 payload is truncated$"):
        decode_payload(Codec.LZ4, lz4_stored[:-4], len(raw))  # all data, no end mark
    with pytest.raises(FrameError, match=r"^bytes after the end of the lz4 payload$"):
        decode_payload(Codec.LZ4, lz4_stored + lz4_stored, len(raw) * 2)
    with pytest.raises(FrameError, match=r"^payload does not decode \(zstd\): "):
        decode_payload(Codec.ZSTD, b"not zstd at all", 10)
    with pytest.raises(
        DecompressionLimitError, match=r"^payload decodes to more than the 99 bytes the chunk"
    ):
        decode_payload(Codec.ZSTD, bytes(encode_payload(Codec.ZSTD, bytes(100))), 99)
    with pytest.raises(FrameError, match=r"^payload decodes to 3 bytes, header says 4$"):
        decode_payload(Codec.NAIVE, b"abc", 4)


def test_a_checksum_mismatch_is_named() -> None:
    frame = bytearray(build_frame(KEY, os.urandom(64), Codec.NAIVE))
    frame[-1] ^= 1
    with pytest.raises(FrameError, match=r"^payload checksum mismatch$"):
        parse_frame(bytes(frame), KEY)


def test_zstd_frames_after_the_first_count() -> None:
    """A zstd stream may hold several frames: all are decoded and capped together; bytes
    hidden in a second frame are never ignored."""
    first, second = os.urandom(100) + bytes(900), bytes(500)
    one = bytes(encode_payload(Codec.ZSTD, first))
    two = bytes(encode_payload(Codec.ZSTD, second))
    assert bytes(decode_payload(Codec.ZSTD, one + two, len(first) + len(second))) == first + second
    with pytest.raises(DecompressionLimitError):
        decode_payload(Codec.ZSTD, one + two, len(first))
