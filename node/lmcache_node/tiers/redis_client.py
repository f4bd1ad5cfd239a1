"""The remote tier's Redis client and the deadline that bounds every call.

redis-py's socket timeouts bound each socket read, connect and pool wait, but not one call:
a call may wait for a pooled connection, resolve the host (DNS has no socket timeout), try
each address it resolves to, run the connection handshake and a health-check PING, and with
Sentinel first ask each sentinel for the master, every step with its own timeout. So calls
run on a small thread pool of their own and the caller waits for the answer until the
operation's deadline at most; a call still running then is abandoned (its thread finishes
within the socket timeouts and its result is dropped), the caller gets a miss.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from lmcache_node.tiers.frame import TierError

T = TypeVar("T")


class CallTimedOut(TierError):  # noqa: N818 - reads as what happened
    """A remote call did not answer before its deadline."""


def make_redis_client(url: str, timeout_secs: float, max_connections: int = 16) -> redis.Redis:
    """A redis-py client with a bounded blocking pool and no retries of its own (ours decide)."""
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


class DeadlineCalls:
    """Runs calls on ``threads`` threads; the caller waits until a deadline at most."""

    def __init__(self, name: str, threads: int) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=name)

    def run(self, fn: Callable[[], T], deadline: float) -> T:
        """``fn()``'s result or exception; CallTimedOut when ``deadline`` (monotonic) passes."""
        future = self._executor.submit(fn)
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            future.cancel()  # not started yet: it never will; running: its result is dropped
            raise CallTimedOut("no answer before the deadline") from None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
