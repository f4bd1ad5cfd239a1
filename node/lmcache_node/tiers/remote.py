"""The remote tier (L3): sealed chunk frames in Redis or Valkey, shared by many nodes.

Values are the same self-checking frames as disk files (header + optionally compressed
payload) followed by a MAC, under names keyed by the cluster's secret (``remote_values``):
another cluster sharing the database can neither find nor forge our values. A value that
fails any check is a miss, counted by reason, never bytes handed to vLLM.

Every operation ends within ``timeout_secs``, retries included: calls run under a deadline
(``redis_client.DeadlineCalls``), are retried by a ``RetryPolicy`` only while time is left, and
a ``CircuitBreaker`` stops calls while Redis is down and lets one trial through after a
cool-down, so the tier recovers by itself. Failures are misses, never exceptions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlparse

import numpy as np
import redis
import torch

from lmcache_node.keys import ChunkKey
from lmcache_node.retry import RetryPolicy
from lmcache_node.tiers.base import RateLimitedLog, TierStats, numpy_views
from lmcache_node.tiers.frame import DEFAULT_LAYOUT, HEADER_BYTES, Codec, TierError, build_frame
from lmcache_node.tiers.redis_client import CallTimedOut, DeadlineCalls, make_redis_client
from lmcache_node.tiers.remote_values import MAC_BYTES, RejectedValue, ValueSeal
from lmcache_node.tiers.resilience import BreakerState, CircuitBreaker
from lmcache_node.tiers.workers import TaskPool

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_LOCATE_KEYS = 512


class RemoteUnavailable(TierError):  # noqa: N818 - reads as a state, like ConnectionRefused
    """The remote store cannot be used right now (down, slow, or the breaker is open)."""


@dataclass
class RemoteTierStats(TierStats):
    """The tier counters plus values refused on read, by reason."""

    rejected_bad_mac: int = 0
    rejected_truncated: int = 0
    rejected_wrong_key: int = 0
    rejected_decompression: int = 0
    rejected_malformed: int = 0


class RemoteTier:
    """L3: sealed chunk frames under ``<prefix>:v2:<keyed name>`` in one Redis/Valkey database.

    ``secret``: the cluster's remote secret (names are HMACs under it, values carry a MAC);
    None only where the operator allowed unauthenticated use (names are then the prefix and
    the key, and the check on read is an unkeyed hash).
    """

    name = "remote"

    def __init__(
        self,
        url: str,
        *,
        secret: bytes | None,
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
        self.seal = ValueSeal(key_prefix, secret)
        self.timeout_secs = timeout_secs
        self.ttl_ms = int(ttl_secs * 1000) if ttl_secs else None
        self.layout = layout
        self.retry = retry or RetryPolicy(deadline_s=timeout_secs)
        self.breaker = breaker or CircuitBreaker(cooldown_secs=max(1.0, 2 * timeout_secs))
        connections = workers + 14  # the tier's pool threads and the request workers' lookups
        self.client = client or make_redis_client(url, timeout_secs, max_connections=connections)
        self.calls = DeadlineCalls("remote-call", connections)
        self.pool = TaskPool("remote-tier", workers, max_pending)
        self._mutex = threading.Lock()
        self._stats = RemoteTierStats(name=self.name)
        self._warn = RateLimitedLog(log)
        self._url_for_logs = _redact(url)

    def redis_key(self, key: ChunkKey) -> str:
        return self.seal.name(key)

    # ----- guarded calls -----
    def _call(self, what: str, fn: Callable[[], T], *, retry: bool) -> T:
        """Run ``fn`` under the breaker, the deadline and the retry policy.

        Returns within ``timeout_secs`` (and the retry policy's deadline, if shorter) whatever
        Redis does; RemoteUnavailable when no answer came in time.
        """
        if not self.breaker.allow():
            raise RemoteUnavailable("circuit breaker open")
        delays = iter(self.retry.delays() if retry else ())
        limit = self.timeout_secs if self.retry.deadline_s is None else self.retry.deadline_s
        deadline = time.monotonic() + min(self.timeout_secs, limit)
        while True:
            try:
                result = self.calls.run(fn, deadline)
            except (redis.RedisError, OSError, CallTimedOut) as exc:
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
        names = [self.seal.name(key) for key in keys]

        def fetch_headers() -> list[bytes]:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.getrange(name, 0, HEADER_BYTES - 1)
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
                header = self.seal.check_head(head, key, self.layout)
            except RejectedValue as exc:
                self._rejected(key, exc)
                break
            sizes.append(header.raw_len)
        if sizes:
            with self._mutex:
                self._stats.lookup_hits += 1
        return sizes

    # ----- reads and writes -----
    def load_into(self, key: ChunkKey, dsts: Sequence[torch.Tensor], nbytes: int) -> bool:
        name = self.seal.name(key)

        def fetch() -> bytes | None:
            value = self.client.get(name)
            return value if isinstance(value, bytes) else None

        try:
            value = self._call("get", fetch, retry=True)
        except RemoteUnavailable:
            self._count_miss()
            return False
        if value is None:
            self._count_miss()
            return False
        try:
            raw = self.seal.open(name, value, key, self.layout, nbytes)
        except RejectedValue as exc:
            self._count_miss()
            self._rejected(key, exc)
            return False
        _copy_into(dsts, raw)
        with self._mutex:
            self._stats.hits += 1
            self._stats.hit_bytes += nbytes
        return True

    def store_from(self, key: ChunkKey, srcs: Sequence[torch.Tensor], nbytes: int) -> bool:
        name = self.seal.name(key)
        value = build_frame(
            self.seal.frame_key(key),
            numpy_views(srcs),
            self.codec,
            self.layout,
            trailer_bytes=MAC_BYTES,
        )
        self.seal.seal(name, value)

        def put() -> None:
            self.client.set(name, value, px=self.ttl_ms)

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
            name = self.seal.name(key)
            return bool(self._call("delete", lambda: self.client.delete(name), retry=True))
        except RemoteUnavailable:
            return False

    def _rejected(self, key: ChunkKey, exc: RejectedValue) -> None:
        """A value failed its checks: a miss, counted by reason, and a rate-limited warning."""
        with self._mutex:
            self._stats.corrupt += 1
            field = f"rejected_{exc.reason.value}"
            setattr(self._stats, field, getattr(self._stats, field) + 1)
        self._warn.warning(
            f"remote-rejected-{exc.reason.value}",
            "remote tier: refused the value of chunk %s (%s); it is a miss",
            key.hex(),
            exc,
        )

    def _count_miss(self) -> None:
        with self._mutex:
            self._stats.misses += 1

    def stats(self) -> RemoteTierStats:
        with self._mutex:
            snapshot = RemoteTierStats(**self._stats.as_dict())  # type: ignore[arg-type]
        state = self.breaker.state
        snapshot.available = state is not BreakerState.OPEN
        snapshot.state = state.value
        snapshot.pending_tasks = self.pool.pending()
        return snapshot

    def close(self) -> None:
        self.pool.close()
        self.calls.close()
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
