"""A work queue per kind of work: one run at a time per key, requests collapse while queued."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import Gauge

from lmcache_operator.retry import REQUEUE
from lmcache_operator.state import Key

logger = logging.getLogger(__name__)

RETRY_DELAY_S = REQUEUE.delay(1)


class Retry(Exception):  # noqa: N818 - a signal, not an error
    """The object changed under us (409): try again shortly, without a traceback."""


class WorkQueue:
    """Runs ``action(key)`` one at a time per key; a request while one is queued collapses.

    ``settle_s`` waits before running so that one burst of events costs one run. A failed
    run is retried after ``RETRY_DELAY_S``.
    """

    def __init__(
        self,
        name: str,
        action: Callable[[Key], Awaitable[None]],
        *,
        settle_s: float = 0.0,
        depth: Gauge | None = None,
    ) -> None:
        self.name = name
        self.action = action
        self.settle_s = settle_s
        self._depth = depth.labels(queue=name) if depth is not None else None
        self._locks: dict[Key, asyncio.Lock] = {}
        self._queued: set[Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, key: Key) -> None:
        if key in self._queued:
            return
        self._queued.add(key)
        self._gauge()
        task = asyncio.get_running_loop().create_task(self._run(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def request_later(self, delay: float, key: Key) -> None:
        asyncio.get_running_loop().call_later(delay, self.request, key)

    def forget(self, key: Key) -> None:
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():
            del self._locks[key]

    def _gauge(self) -> None:
        if self._depth is not None:
            self._depth.set(len(self._queued))

    async def _run(self, key: Key) -> None:
        if self.settle_s:
            await asyncio.sleep(self.settle_s)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            self._queued.discard(key)
            self._gauge()
            try:
                await self.action(key)
            except Retry as exc:
                logger.debug("%s of %s/%s: %s; again in %s s", self.name, *key, exc, RETRY_DELAY_S)
                self.request_later(RETRY_DELAY_S, key)
            except Exception:
                logger.exception(
                    "%s of %s/%s failed; retrying in %s s", self.name, *key, RETRY_DELAY_S
                )
                self.request_later(RETRY_DELAY_S, key)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
