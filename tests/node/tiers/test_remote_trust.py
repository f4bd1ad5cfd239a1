"""The remote tier's trust model against a real redis-server: clusters sharing one database,
forged, damaged and oversized values, the secret's checks, and a hung Redis."""

from __future__ import annotations

import logging
import os
import threading
import time
import tracemalloc
from pathlib import Path

import lz4.frame
import pytest
import torch
import zstandard
from lmcache_node.assembly import build_engine
from lmcache_node.config import load_config
from lmcache_node.engine import CacheEngine
from lmcache_node.retry import RetryPolicy
from lmcache_node.tiers.frame import (
    HEADER_BYTES,
    Codec,
    FrameHeader,
    build_frame,
    encode_header,
    payload_checksum,
)
from lmcache_node.tiers.manager import TieredStore
from lmcache_node.tiers.metrics import TierCollector
from lmcache_node.tiers.remote import RemoteTier
from lmcache_node.tiers.remote_values import MAC_BYTES, RemoteSecretError
from lmcache_node.tiers.resilience import CircuitBreaker
from prometheus_client import CollectorRegistry

from tests.node.tiers.conftest import RedisServer, make_keys, payload_for

pytestmark = [pytest.mark.integration, pytest.mark.redis]

CHUNK = 50_000


def tier_for(
    server: RedisServer, prefix: str, secret: bytes | None, **kwargs: object
) -> RemoteTier:
    options: dict[str, object] = {
        "secret": secret,
        "key_prefix": prefix,
        "timeout_secs": 2.0,  # the whole operation: generous for a loaded machine
        "retry": RetryPolicy(attempts=2, base_s=0.01),
        "breaker": CircuitBreaker(threshold=100, cooldown_secs=0.5),
    }
    options.update(kwargs)
    return RemoteTier(server.url, **options)  # type: ignore[arg-type]


def store(tier: RemoteTier, key: bytes, data: torch.Tensor | None = None) -> bool:
    data = payload_for(key, CHUNK) if data is None else data  # type: ignore[arg-type]
    return tier.store_from(key, [data], CHUNK)  # type: ignore[arg-type]


def load(tier: RemoteTier, key: bytes) -> torch.Tensor | None:
    out = torch.zeros(CHUNK, dtype=torch.uint8)
    return out if tier.load_into(key, [out], CHUNK) else None  # type: ignore[arg-type]


def rejected(tier: RemoteTier, reason: str) -> int:
    return int(tier.stats().as_dict()[f"rejected_{reason}"])


def test_two_clusters_sharing_redis_neither_read_nor_poison_each_other(
    redis_server: RedisServer,
) -> None:
    a = tier_for(redis_server, "team-a/cache", os.urandom(32))
    b = tier_for(redis_server, "team-b/cache", os.urandom(32))
    same_prefix = tier_for(redis_server, "team-a/cache", os.urandom(32))  # prefix is not enough
    keys = make_keys(3)  # the same model and prompts: the same chunk keys in both clusters
    for key in keys:
        assert store(a, key)
    for other in (b, same_prefix):
        assert other.locate(keys) == []
        assert all(load(other, key) is None for key in keys)

    # B writes poison for the same chunks, finds A's values with SCAN and overwrites them.
    poison = torch.full((CHUNK,), 7, dtype=torch.uint8)
    for key in keys:
        assert store(b, key, poison)
    client = redis_server.client()
    names_a = sorted(client.scan_iter(match="team-a/cache:*"))
    names_b = sorted(client.scan_iter(match="team-b/cache:*"))
    assert len(names_a) == len(names_b) == 3
    for name_a, name_b in zip(names_a, names_b, strict=True):
        client.set(name_a, client.get(name_b))

    engine = CacheEngine(64 * 4096, 4096, pin_memory=False)
    TieredStore([a]).attach(engine)
    registry = CollectorRegistry()
    registry.register(TierCollector(engine))
    assert a.locate(keys) == []  # the headers are not A's
    for key in keys:
        assert load(a, key) is None  # the MAC is not A's: a miss, never the poison
    assert rejected(a, "bad_mac") == 3 and rejected(a, "wrong_key") == 1
    sample = registry.get_sample_value
    assert sample("lmcache_node_remote_rejected_total", {"reason": "bad_mac"}) == 3.0
    assert sample("lmcache_node_remote_rejected_total", {"reason": "wrong_key"}) == 1.0
    engine.close()
    for tier in (a, b, same_prefix):
        tier.close()


def test_a_value_rebuilt_without_the_secret_is_refused(redis_server: RedisServer) -> None:
    """Changing a byte and fixing every unkeyed checksum (as anyone could) is still a miss."""
    tier = tier_for(redis_server, "c", os.urandom(32))
    key = make_keys(1)[0]
    assert store(tier, key)
    client = redis_server.client()
    name = tier.redis_key(key)
    value = client.get(name)
    assert value is not None
    frame, tag = value[:-MAC_BYTES], value[-MAC_BYTES:]
    payload = bytearray(frame[HEADER_BYTES:])
    payload[1000] ^= 0xFF
    rebuilt = build_frame(tier.seal.frame_key(key), bytes(payload), Codec.NAIVE)
    client.set(name, bytes(rebuilt) + tag)
    assert tier.locate([key]) == [CHUNK]  # the header is fine: only the MAC can tell
    assert load(tier, key) is None
    assert rejected(tier, "bad_mac") == 1
    tier.close()


@pytest.mark.parametrize("position", [0, 40, HEADER_BYTES + 10, -MAC_BYTES - 1, -1])
def test_a_flipped_byte_is_a_miss(redis_server: RedisServer, position: int) -> None:
    tier = tier_for(redis_server, "c", os.urandom(32), serde="lz4")
    key = make_keys(1)[0]
    assert store(tier, key)
    client = redis_server.client()
    value = bytearray(client.get(tier.redis_key(key)))
    value[position] ^= 0x01
    client.set(tier.redis_key(key), bytes(value))
    assert load(tier, key) is None
    assert rejected(tier, "bad_mac") == 1
    tier.close()


def test_truncated_and_misplaced_values_are_refused_by_reason(redis_server: RedisServer) -> None:
    tier = tier_for(redis_server, "c", os.urandom(32))
    first, second = make_keys(2)
    assert store(tier, first) and store(tier, second)
    client = redis_server.client()
    value = client.get(tier.redis_key(first))
    client.set(tier.redis_key(first), value[: len(value) // 2])
    assert load(tier, first) is None
    assert rejected(tier, "truncated") == 1

    # an intact frame of the second chunk, sealed for the first one's name (only a writer with
    # the secret can do this): the key inside the frame decides
    name = tier.redis_key(first)
    misplaced = build_frame(
        tier.seal.frame_key(second), payload_for(second, CHUNK).numpy(), Codec.NAIVE,
        trailer_bytes=MAC_BYTES,
    )  # fmt: skip
    tier.seal.seal(name, misplaced)
    client.set(name, bytes(misplaced))
    assert load(tier, first) is None
    assert rejected(tier, "wrong_key") == 1
    out = load(tier, second)
    assert out is not None and torch.equal(out, payload_for(second, CHUNK))
    tier.close()


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.LZ4])
def test_decompression_bomb_under_a_valid_mac_is_a_miss(
    redis_server: RedisServer, codec: Codec
) -> None:
    """A small value that expands far beyond the chunk, sealed with the real secret (so the
    MAC passes): the decompression cap stops it, without allocating the expansion."""
    tier = tier_for(redis_server, "c", os.urandom(32))
    key = make_keys(1)[0]
    expanded = bytes(100 * 1024**2)
    if codec is Codec.ZSTD:
        payload = zstandard.ZstdCompressor(level=3).compress(expanded)
    else:
        payload = lz4.frame.compress(expanded)
    assert len(payload) < 2 * 1024**2
    header = FrameHeader(
        key=tier.seal.frame_key(key), codec=codec, header_len=HEADER_BYTES,
        stored_len=len(payload), raw_len=CHUNK, checksum=payload_checksum([payload]),
        layout=tier.layout,
    )  # fmt: skip
    frame = encode_header(header) + payload
    name = tier.redis_key(key)
    redis_server.client().set(name, frame + tier.seal.tag(name, frame))
    assert tier.locate([key]) == [CHUNK]
    tracemalloc.start()
    try:
        assert load(tier, key) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rejected(tier, "decompression") == 1
    assert peak < 8 * 1024**2, f"decoding allocated {peak} bytes"
    tier.close()


def test_values_of_the_previous_format_are_misses(redis_server: RedisServer) -> None:
    tier = tier_for(redis_server, "lmcache", os.urandom(32))
    keys = make_keys(2)
    client = redis_server.client()
    for key in keys:  # what the previous release wrote: an unsealed frame under :v1:
        client.set(f"lmcache:v1:{key.hex()}", bytes(build_frame(key, b"x" * CHUNK, Codec.NAIVE)))
    assert tier.locate(keys) == [] and load(tier, keys[0]) is None
    assert tier.stats().errors == 0
    assert store(tier, keys[0])  # and the new format is written next to them
    assert tier.locate(keys) == [CHUNK]
    tier.close()


def test_without_a_secret_the_values_are_still_checked(redis_server: RedisServer) -> None:
    tier = tier_for(redis_server, "open", None)
    key = make_keys(1)[0]
    assert store(tier, key)
    assert tier.redis_key(key) == f"open:v2:{key.hex()}"
    out = load(tier, key)
    assert out is not None and torch.equal(out, payload_for(key, CHUNK))
    client = redis_server.client()
    value = bytearray(client.get(tier.redis_key(key)))
    value[HEADER_BYTES + 5] ^= 0x10
    client.set(tier.redis_key(key), bytes(value))
    assert load(tier, key) is None and rejected(tier, "bad_mac") == 1
    tier.close()


def test_hung_redis_never_blocks_far_beyond_the_timeout(redis_server: RedisServer) -> None:
    """Property: with Redis stopped (SIGSTOP), every operation returns a miss within a small
    multiple of remote_timeout_secs, even with more callers than connections. The bound (2x)
    is generous on purpose: it separates "bounded by the timeout" from "one timeout per retry,
    pool wait and handshake", not a speed claim."""
    timeout = 1.0
    tier = RemoteTier(
        redis_server.url,
        secret=os.urandom(32),
        timeout_secs=timeout,  # the default retry policy of the tier
        breaker=CircuitBreaker(threshold=1000),  # every call goes to Redis
    )
    keys = make_keys(2)
    assert store(tier, keys[0])
    bound = 2 * timeout
    redis_server.pause()
    try:
        for what, call in [
            ("lookup", lambda: tier.locate(keys)),
            ("get", lambda: load(tier, keys[0])),
            ("set", lambda: store(tier, keys[1])),
        ]:
            start = time.monotonic()
            assert call() in ([], None, False), what
            assert time.monotonic() - start < bound, what

        durations: list[float] = []
        mutex = threading.Lock()

        def one_load() -> None:
            start = time.monotonic()
            assert load(tier, keys[0]) is None
            with mutex:
                durations.append(time.monotonic() - start)

        threads = [threading.Thread(target=one_load) for _ in range(24)]  # > 16 connections
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(durations) == 24
        assert max(durations) < bound, sorted(durations)
    finally:
        redis_server.resume()
    tier.close()


# ----- the secret: refused unless present and long enough, or explicitly waived -----
def remote_config(redis_server: RedisServer, **extra: object) -> dict[str, object]:
    return {"max_local_cpu_size": 0.01, "remote_url": redis_server.url, **extra}


def test_remote_tier_refuses_to_start_without_a_secret(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="remote_secret_file") as refused:
        build_engine(load_config(remote_config(redis_server), environ={}))
    assert "insecure_allow_unauthenticated" in str(refused.value)

    short = tmp_path / "short.key"
    short.write_bytes(b"fifteen bytes!!\n")
    missing = tmp_path / "missing.key"
    for path, message in [(short, "holds 15 bytes"), (missing, "cannot read")]:
        config = load_config(remote_config(redis_server, remote_secret_file=str(path)), environ={})
        with pytest.raises(RemoteSecretError, match=message):
            build_engine(config)
    assert redis_server.client().dbsize() == 0


def test_insecure_remote_tier_runs_with_a_warning(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(
        remote_config(redis_server, insecure_allow_unauthenticated=True), environ={}
    )
    with caplog.at_level(logging.WARNING):
        engine = build_engine(config)
    assert "WITHOUT a secret" in caplog.text
    key = make_keys(1)[0]
    engine.put(key, payload_for(key, CHUNK))
    assert engine.lower_tiers is not None and engine.lower_tiers.flush(30)
    assert redis_server.client().exists(f"lmcache:v2:{key.hex()}") == 1
    engine.close()


def test_secret_file_keys_the_names(redis_server: RedisServer, tmp_path: Path) -> None:
    secret = tmp_path / "remote.key"
    secret.write_bytes(os.urandom(32).hex().encode() + b"\n")
    config = load_config(
        remote_config(redis_server, remote_secret_file=str(secret), remote_key_prefix="ns/c"),
        environ={},
    )
    engine = build_engine(config)
    key = make_keys(1)[0]
    engine.put(key, payload_for(key, CHUNK))
    assert engine.lower_tiers is not None and engine.lower_tiers.flush(30)
    names = [n.decode() for n in redis_server.client().keys("*")]
    assert len(names) == 1 and names[0].startswith("ns/c:v2:") and key.hex() not in names[0]
    engine.close()
