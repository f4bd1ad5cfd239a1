"""The remote tier (L3): framed chunks in Redis or Valkey, shared by many nodes.

Values are the same self-checking frames as disk files (header + optionally compressed
payload). Every call has a socket timeout; calls are retried by a ``RetryPolicy`` within a
deadline; a ``CircuitBreaker`` stops calls while Redis is down and lets one trial through
after a cool-down, so the tier recovers by itself. Failures are misses, never exceptions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import numpy as np
import redis
import redis.sentinel
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from lmcache_node.keys import ChunkKey
from lmcache_node.tiers.base import RateLimitedLog, TierStats, numpy_views
from lmcache_node.tiers.frame import (
    DEFAULT_LAYOUT,
    FORMAT_VERSION,
    HEADER_BYTES,
    Codec,
    FrameError,
    TierError,
    build_frame,
    check_header,
    decode_header,
    parse_frame,
)
from lmcache_node.tiers.resilience import BreakerState, CircuitBreaker, RetryPolicy
from lmcache_node.tiers.workers import TaskPool

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_LOCATE_KEYS = 512


class RemoteUnavailable(TierError):  # noqa: N818 - reads as a state, like ConnectionRefused
    """The remote store cannot be used right now (down, slow, or the breaker is open)."""


def make_redis_client(url: str, timeout_secs: float, max_connections: int = 16) -> redis.Redis:
    """A redis-py client with a bounded blocking pool and our own retries (none inside)."""
    scheme = urlparse(url).scheme
    no_retry = Retry(NoBackoff(), 0)
    options: dict[str, object] = {
        "socket_timeout": timeout_secs,
        "socket_connect_timeout": timeout_secs,
        "retry": no_retry,
        "health_check_interval": 30,
    }
    if scheme == "redis-sentinel":
        return _sentinel_client(url, options)
    if scheme in ("valkey", "valkeys"):
        url = ("redis" if scheme == "valkey" else "rediss") + url[len(scheme) :]
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_secs, **options
    )
    return redis.Redis(connection_pool=pool, retry=no_retry)


def _sentinel_client(url: str, options: dict[str, Any]) -> redis.Redis:
    """``redis-sentinel://[:password@]host:port[,host:port...]/service_name[/db]``."""
    parsed = urlparse(url)
    hosts_part = parsed.netloc.rsplit("@", 1)[-1]
    password = unquote(parsed.password) if parsed.password else None
    sentinels: list[tuple[str, int]] = []
    for item in hosts_part.split(","):
        host, _, port = item.partition(":")
        sentinels.append((host, int(port or 26379)))
    parts = [p for p in parsed.path.split("/") if p]
    if not parts:
        raise ValueError(
            "redis-sentinel:// URLs name the service: redis-sentinel://host:26379/mymaster"
        )
    db = int(parts[1]) if len(parts) > 1 else 0
    sentinel = redis.sentinel.Sentinel(sentinels, sentinel_kwargs=dict(options), **options)
    client: redis.Redis = sentinel.master_for(parts[0], db=db, password=password, **options)
    return client


class RemoteTier:
    """L3: chunk frames under ``<prefix>:v<format>:<key hex>`` in one Redis/Valkey database."""

    name = "remote"

    def __init__(
        self,
        url: str,
        *,
        serde: str = "naive",
        timeout_secs: float = 1.0,
        ttl_secs: float | None = None,
        key_prefix: str = "lmcache",
        layout: str = DEFAULT_LAYOUT,
        workers: int = 2,
        max_pending: int = 16,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        self.codec = Codec.from_serde(serde)
        self.timeout_secs = timeout_secs
        self.ttl_ms = int(ttl_secs * 1000) if ttl_secs else None
        self.key_prefix = f"{key_prefix}:v{FORMAT_VERSION}:"
        self.layout = layout
        self.retry = retry or RetryPolicy(deadline_secs=max(2.0, 3 * timeout_secs))
        self.breaker = breaker or CircuitBreaker(cooldown_secs=max(1.0, 2 * timeout_secs))
        self.client = client or make_redis_client(url, timeout_secs, max_connections=workers + 14)
        self.pool = TaskPool("remote-tier", workers, max_pending)
        self._mutex = threading.Lock()
        self._stats = TierStats(name=self.name)
        self._warn = RateLimitedLog(log)
        self._url_for_logs = _redact(url)

    def redis_key(self, key: ChunkKey) -> str:
        return self.key_prefix + key.hex()

    # ----- guarded calls -----
    def _call(self, what: str, fn: Callable[[], T], *, retry: bool) -> T:
        """Run ``fn`` under the breaker and retry policy; RemoteUnavailable when it cannot."""
        if not self.breaker.allow():
            raise RemoteUnavailable("circuit breaker open")
        delays = iter(self.retry.delays() if retry else ())
        deadline = time.monotonic() + self.retry.deadline_secs
        while True:
            try:
                result = fn()
            except (redis.RedisError, OSError) as exc:
                with self._mutex:
                    self._stats.errors += 1
                delay = next(delays, None)
                if delay is not None and time.monotonic() + delay < deadline:
                    time.sleep(delay)
                    continue
                if self.breaker.failed():
                    log.warning(
                        "remote tier %s unavailable (%s failed: %s); requests are misses "
                        "until it answers again",
                        self._url_for_logs,
                        what,
                        exc,
                    )
                else:
                    self._warn.warning("remote-call", "remote tier: %s failed: %s", what, exc)
                raise RemoteUnavailable(f"{what} failed: {exc}") from exc
            was = self.breaker.state
            self.breaker.succeeded()
            if was is not BreakerState.CLOSED:
                log.info("remote tier %s is available again", self._url_for_logs)
            return result

    # ----- queries -----
    def has(self, key: ChunkKey) -> bool:
        return False  # a network round trip is not cheap: callers must not rely on it

    def locate(self, keys: Sequence[ChunkKey]) -> list[int]:
        keys = list(keys[:MAX_LOCATE_KEYS])
        if not keys:
            return []

        def fetch_headers() -> list[bytes]:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.getrange(self.redis_key(key), 0, HEADER_BYTES - 1)
            return list(pipe.execute())

        with self._mutex:
            self._stats.lookups += 1
        try:
            heads = self._call("lookup", fetch_headers, retry=False)
        except RemoteUnavailable:
            return []
        sizes: list[int] = []
        for key, head in zip(keys, heads, strict=True):
            if not head:
                break
            try:
                header = decode_header(head)
                check_header(header, key, self.layout)
            except FrameError as exc:
                with self._mutex:
                    self._stats.corrupt += 1
                self._bad_value(key, exc)
                break
            sizes.append(header.raw_len)
        if sizes:
            with self._mutex:
                self._stats.lookup_hits += 1
        return sizes

    # ----- reads and writes -----
    def load_into(self, key: ChunkKey, dsts: Sequence[torch.Tensor], nbytes: int) -> bool:
        def fetch() -> bytes | None:
            value = self.client.get(self.redis_key(key))
            return value if isinstance(value, bytes) else None

        try:
            frame = self._call("get", fetch, retry=True)
        except RemoteUnavailable:
            self._count_miss()
            return False
        if frame is None:
            self._count_miss()
            return False
        try:
            raw = parse_frame(frame, key, self.layout)
            if len(raw) != nbytes:
                raise FrameError(f"value holds {len(raw)} bytes, {nbytes} expected")
        except FrameError as exc:
            with self._mutex:
                self._stats.corrupt += 1
                self._stats.misses += 1
            self._bad_value(key, exc)
            return False
        _copy_into(dsts, raw)
        with self._mutex:
            self._stats.hits += 1
            self._stats.hit_bytes += nbytes
        return True

    def store_from(self, key: ChunkKey, srcs: Sequence[torch.Tensor], nbytes: int) -> bool:
        frame = build_frame(key, numpy_views(srcs), self.codec, self.layout)

        def put() -> None:
            self.client.set(self.redis_key(key), frame, px=self.ttl_ms)

        try:
            self._call("set", put, retry=True)
        except RemoteUnavailable:
            with self._mutex:
                self._stats.dropped_stores += 1
            return False
        with self._mutex:
            self._stats.stores += 1
            self._stats.stored_bytes += nbytes
        return True

    def remove(self, key: ChunkKey) -> bool:
        try:
            name = self.redis_key(key)
            return bool(self._call("delete", lambda: self.client.delete(name), retry=True))
        except RemoteUnavailable:
            return False

    def _bad_value(self, key: ChunkKey, exc: FrameError) -> None:
        self._warn.warning("remote-corrupt", "remote tier: bad value for %s: %s", key.hex(), exc)

    def _count_miss(self) -> None:
        with self._mutex:
            self._stats.misses += 1

    def stats(self) -> TierStats:
        with self._mutex:
            snapshot = TierStats(**self._stats.as_dict())  # type: ignore[arg-type]
        state = self.breaker.state
        snapshot.available = state is not BreakerState.OPEN
        snapshot.state = state.value
        snapshot.pending_tasks = self.pool.pending()
        return snapshot

    def close(self) -> None:
        self.pool.close()
        try:
            self.client.close()
        except (redis.RedisError, OSError) as exc:
            log.debug("remote tier: closing the client: %s", exc)


def _copy_into(dsts: Sequence[torch.Tensor], raw: bytes | memoryview) -> None:
    source = np.frombuffer(raw, dtype=np.uint8)
    offset = 0
    for dst in dsts:
        count = dst.numel()
        dst.numpy()[:] = source[offset : offset + count]
        offset += count


def _redact(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    return url.replace(f":{parsed.password}@", ":***@")
