"""What a node server publishes about its contents: key events per tier, and snapshots.

The events socket is a ZMQ PUB (CURVE like the request port). Each message is two frames,
``[TOPIC, EventBatch]`` (msgpack). Batches carry a sequence number that grows by one per
batch; a heartbeat repeats the last number with no events, so a subscriber that missed the
last batch notices it. A subscriber that sees a gap, another ``epoch`` (the server
restarted) or that (re)connects asks for a snapshot (``Op.SNAPSHOT`` on the request port),
applies it, and resumes with the batches numbered above the snapshot's ``seq``.

Keys travel as digests: the first ``DIGEST_BYTES`` bytes of each chunk key (a hash already),
concatenated. Never data, never token ids.
"""

from __future__ import annotations

import enum

import msgspec
import numpy as np

TOPIC = b"lmcache.events.v1"
DIGEST_BYTES = 8
TIERS = ("l1", "l2")  # the node's own tiers; the remote tier is shared by every node


class EventKind(str, enum.Enum):
    STORED = "stored"
    EVICTED = "evicted"
    CLEARED = "cleared"  # every key of the tier is gone (digests empty)


class KeyEvent(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    kind: str  # an EventKind value
    tier: str  # "l1" or "l2"
    digests: bytes = b""  # DIGEST_BYTES per key, in the order the changes happened


class NamespaceInfo(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """A key namespace some registered worker uses (``keys.KeyNamespace.seed()``)."""

    seed: bytes
    model_name: str
    worker_id: int = 0
    layout: str = ""


class EventBatch(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    epoch: int  # random per server start: another epoch means another key space
    seq: int  # 1 for the first batch; a heartbeat repeats the last one with no events
    ts: float  # server wall clock when sent
    events: list[KeyEvent] = msgspec.field(default_factory=list)
    namespaces: list[NamespaceInfo] | None = None  # the full set, when it changed


_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(EventBatch)


class EventDecodeError(ValueError):
    """A message on the events socket that is not an ``EventBatch``."""


def encode_batch(batch: EventBatch) -> list[bytes]:
    return [TOPIC, _encoder.encode(batch)]


def decode_batch(frames: list[bytes]) -> EventBatch:
    if len(frames) != 2 or frames[0] != TOPIC:
        raise EventDecodeError(
            f"expected 2 frames with topic {TOPIC!r}, got {len(frames)} frame(s): is the "
            "publisher an lmcache-node server of the same version?"
        )
    try:
        batch = _batch_decoder.decode(frames[1])
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise EventDecodeError(f"invalid event batch: {exc}") from None
    for event in batch.events:
        if len(event.digests) % DIGEST_BYTES:
            raise EventDecodeError(
                f"{event.kind} event of tier {event.tier} has {len(event.digests)} digest "
                f"bytes, not a multiple of {DIGEST_BYTES}"
            )
    return batch


def digest(key: bytes) -> bytes:
    """The digest of a chunk key as events and snapshots carry it."""
    return bytes(key[:DIGEST_BYTES])


def digest_int(key: bytes) -> int:
    """The digest as an int (how indexes store it: a small object, cheap to hash)."""
    return int.from_bytes(key[:DIGEST_BYTES], "little")


def split_digests(data: bytes) -> list[int]:
    """Concatenated digests -> ints (``digest_int`` of each)."""
    values: list[int] = np.frombuffer(data, dtype="<u8").tolist()
    return values
