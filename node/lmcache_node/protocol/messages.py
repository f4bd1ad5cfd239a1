"""Message types of protocol version 2.

A request is two ZMQ frames, ``[header, payload]``; the server's ROUTER prepends the
peer's routing id. A reply has the same shape: the header echoes the op and request id
and carries a status; the payload is the op's reply struct, or an ``ErrorReply``.
Everything is msgpack via msgspec structs (never pickle): unknown fields are rejected,
wrong types raise ``msgspec.ValidationError``.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from lmcache_node.protocol.events import NamespaceInfo

MAGIC = b"LMCN"
PROTOCOL_VERSION = 2  # 2: CURVE transport, session ownership, bounds, shm_dir
TRANSFER_MODES = ("shared", "engine")


class Op(enum.IntEnum):
    HANDSHAKE = 1
    REGISTER = 2
    UNREGISTER = 3
    LOOKUP = 4
    STORE = 5
    RETRIEVE = 6
    FREE_LOCK = 7
    END_SESSION = 8
    CLEAR = 9
    PING = 10
    STATS = 11
    SNAPSHOT = 12  # the keys each tier holds, for a subscriber of the events socket


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1


class ErrorCode(str, enum.Enum):
    """Typed errors; the message of each says what was wrong and what to do."""

    BAD_FRAME = "bad_frame"  # not our framing: wrong frame count, magic or msgpack
    BAD_VERSION = "bad_version"  # protocol version the server does not speak
    UNKNOWN_OP = "unknown_op"
    BAD_REQUEST = "bad_request"  # payload of the wrong shape or type, invalid values
    NO_SESSION = "no_session"  # no handshake from this client (e.g. the server restarted)
    INCOMPATIBLE = "incompatible"  # chunk size / transfer mode the server cannot serve
    NOT_REGISTERED = "not_registered"  # unknown registration id
    OUT_OF_RANGE = "out_of_range"  # block id outside the registered tensors
    REGISTRATION_FAILED = "registration_failed"  # tensors could not be mapped or checked
    SHUTTING_DOWN = "shutting_down"
    FORBIDDEN = "forbidden"  # a lock or registration of another session
    BUSY = "busy"  # the request queue is full: back off and retry
    LIMIT_EXCEEDED = "limit_exceeded"  # a size, count or time above the server's bound
    INTERNAL = "internal"  # a bug: logged with its traceback on the server


class _Msg(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class Header(msgspec.Struct, array_like=True, frozen=True):
    magic: bytes
    version: int
    op: int
    request_id: int
    status: int = 0


class ErrorReply(_Msg):
    code: str
    message: str


# ----- handshake -----
class HandshakeRequest(_Msg):
    client_version: str
    protocol_version: int = PROTOCOL_VERSION
    chunk_size: int = 0  # 0: accept the server's
    pid: int = 0
    hostname: str = ""


class HandshakeReply(_Msg):
    server_version: str
    protocol_version: int
    chunk_size: int
    hash_algorithm: str
    transfer_modes: list[str]
    device: str
    heartbeat_timeout_s: float
    shm_dir: str = ""  # where shm segments of this server's cluster live
    limits: dict[str, float] = msgspec.field(default_factory=dict)  # max_* bounds in force


# ----- registration -----
class SegmentDesc(_Msg):
    """One shared memory region holding the storage of one or more layers.

    ``kind`` "shm": a file named ``name`` of exactly ``nbytes`` bytes in the server's shm
    directory (``HandshakeReply.shm_dir``).
    ``kind`` "cuda_ipc": ``cuda`` holds the storage's IPC handle fields
    (device, handle, size, offset, ref counter handle/offset, event handle, sync flag).
    """

    kind: str
    nbytes: int
    name: str = ""
    cuda: list[Any] = msgspec.field(default_factory=list)


class LayerDesc(_Msg):
    """One layer's KV tensor as a strided view of a segment (offsets in elements)."""

    dtype: str
    shape: list[int]
    stride: list[int]
    storage_offset: int = 0
    segment: int = 0


class RegisterRequest(_Msg):
    worker_id: int
    layout: str
    block_dim: int
    block_size: int
    layers: list[LayerDesc]
    segments: list[SegmentDesc] = msgspec.field(default_factory=list)
    transfer_mode: str = "shared"
    device: str = "cpu"
    staging_chunks: int = 8  # engine mode: chunks per staging area
    event_handle: bytes = b""  # CUDA: interprocess event the worker records before a store
    # The worker's key namespace (published to routers, which compute the same keys)
    model_name: str = ""
    key_seed: bytes = b""  # keys.KeyNamespace.seed() of this worker


class RegisterReply(_Msg):
    registration_id: int
    num_layers: int
    blocks_per_chunk: int
    chunk_bytes: int  # bytes of one full chunk (all layers)
    staging_name: str = ""  # engine mode: the server-owned staging area in shm_dir
    staging_chunks: int = 0


class UnregisterRequest(_Msg):
    registration_id: int


class UnregisterReply(_Msg):
    removed: bool


# ----- data path -----
class LookupRequest(_Msg):
    keys: list[bytes]
    lock: bool = False
    lock_ttl_s: float | None = None


class LookupReply(_Msg):
    hits: int
    lock_id: int | None = None


class StoreRequest(_Msg):
    registration_id: int
    keys: list[bytes]
    block_ids: list[int]
    num_tokens: int = 0  # for the log line; 0: keys x chunk size


class StoreReply(_Msg):
    stored: int  # leading chunks now in the cache (duplicates count)
    duplicates: int = 0
    no_space: int = 0


class RetrieveRequest(_Msg):
    registration_id: int
    keys: list[bytes]
    block_ids: list[int]


class RetrieveReply(_Msg):
    retrieved: int  # leading chunks written into the blocks


class FreeLockRequest(_Msg):
    lock_ids: list[int]


class FreeLockReply(_Msg):
    freed: int


class EndSessionRequest(_Msg):
    pass


class EndSessionReply(_Msg):
    locks_released: int
    registrations_removed: int


class ClearRequest(_Msg):
    pass


class ClearReply(_Msg):
    cleared: int


class PingRequest(_Msg):
    pass


class PingReply(_Msg):
    server_time: float


class StatsRequest(_Msg):
    pass


class StatsReply(_Msg):
    stats: dict[str, Any]


# ----- routing -----
class SnapshotRequest(_Msg):
    tiers: list[str] = msgspec.field(default_factory=list)  # empty: every tier
    with_keys: bool = True  # False: only the numbers, the events port and the namespaces


class SnapshotReply(_Msg):
    """The keys each tier held after event batch ``seq`` of ``epoch`` (digests, see
    ``protocol.events``); a tier above the server's bound is cut to its most recent keys."""

    epoch: int
    seq: int
    events_port: int
    chunk_size: int
    tiers: dict[str, bytes]
    truncated: list[str] = msgspec.field(default_factory=list)
    namespaces: list[NamespaceInfo] = msgspec.field(default_factory=list)


REQUEST_TYPES: dict[Op, type[msgspec.Struct]] = {
    Op.HANDSHAKE: HandshakeRequest,
    Op.REGISTER: RegisterRequest,
    Op.UNREGISTER: UnregisterRequest,
    Op.LOOKUP: LookupRequest,
    Op.STORE: StoreRequest,
    Op.RETRIEVE: RetrieveRequest,
    Op.FREE_LOCK: FreeLockRequest,
    Op.END_SESSION: EndSessionRequest,
    Op.CLEAR: ClearRequest,
    Op.PING: PingRequest,
    Op.STATS: StatsRequest,
    Op.SNAPSHOT: SnapshotRequest,
}

REPLY_TYPES: dict[Op, type[msgspec.Struct]] = {
    Op.HANDSHAKE: HandshakeReply,
    Op.REGISTER: RegisterReply,
    Op.UNREGISTER: UnregisterReply,
    Op.LOOKUP: LookupReply,
    Op.STORE: StoreReply,
    Op.RETRIEVE: RetrieveReply,
    Op.FREE_LOCK: FreeLockReply,
    Op.END_SESSION: EndSessionReply,
    Op.CLEAR: ClearReply,
    Op.PING: PingReply,
    Op.STATS: StatsReply,
    Op.SNAPSHOT: SnapshotReply,
}
