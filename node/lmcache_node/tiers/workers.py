"""A bounded thread pool with priorities: prefetch before delete before put.

Lower tiers do their slow work here so the request path never waits on a disk or a network,
except for the reads it asked for. A full queue refuses new work (the caller counts a drop);
it never blocks the caller.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Priority(enum.IntEnum):
    PREFETCH = 0
    DELETE = 1
    PUT = 2


class TaskPool:
    """``workers`` daemon threads draining a priority queue of at most ``max_pending`` puts."""

    def __init__(self, name: str, workers: int, max_pending: int) -> None:
        if workers < 1 or max_pending < 1:
            raise ValueError("a task pool needs at least one worker and one queue slot")
        self.name = name
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._queue: list[tuple[int, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._pending = {p: 0 for p in Priority}
        self._busy = 0
        self._closed = False
        self.refused = 0
        self.failed = 0
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def _limit(self, priority: Priority) -> int:
        # Puts are bounded tightly; prefetches and deletes get headroom above them.
        return self.max_pending if priority is Priority.PUT else 4 * self.max_pending

    def submit(self, priority: Priority, task: Callable[[], None]) -> bool:
        """Queue ``task``; False (nothing queued) when the pool is full or closed."""
        with self._cond:
            if self._closed or self._pending[priority] >= self._limit(priority):
                self.refused += 1
                return False
            self._pending[priority] += 1
            heapq.heappush(self._queue, (int(priority), next(self._order), task))
            self._cond.notify()
            return True

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._busy

    def drain(self, timeout: float) -> bool:
        """Wait until no task is queued or running; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking work, finish what is queued (bounded by ``timeout``)."""
        self.drain(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=max(0.0, timeout))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                priority, _, task = heapq.heappop(self._queue)
                self._pending[Priority(priority)] -= 1
                self._busy += 1
            try:
                task()
            except Exception:  # a task bug must not kill the worker thread
                self.failed += 1
                log.exception("%s: background task failed", self.name)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()
