"""Circuit breaker for the remote tier (its retry policy: lmcache_node.retry)."""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable


class BreakerState(enum.Enum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls are refused until the cool-down ends
    HALF_OPEN = "half_open"  # one trial call decides


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; after ``cooldown_secs`` one trial call."""

    def __init__(
        self,
        threshold: int = 3,
        cooldown_secs: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown_secs = cooldown_secs
        self._clock = clock
        self._mutex = threading.Lock()
        self._failures = 0
        self._opened_at = 0.0
        self._state = BreakerState.CLOSED
        self._trial_running = False
        self.opened_count = 0

    @property
    def state(self) -> BreakerState:
        with self._mutex:
            if self._state is BreakerState.OPEN and self._cool():
                return BreakerState.HALF_OPEN
            return self._state

    def _cool(self) -> bool:
        return self._clock() - self._opened_at >= self.cooldown_secs

    def allow(self) -> bool:
        """May a call go out now? In half-open state only one trial at a time."""
        with self._mutex:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN and self._cool():
                self._state = BreakerState.HALF_OPEN
            if self._state is BreakerState.HALF_OPEN and not self._trial_running:
                self._trial_running = True
                return True
            return False

    def succeeded(self) -> None:
        with self._mutex:
            self._failures = 0
            self._state = BreakerState.CLOSED
            self._trial_running = False

    def failed(self) -> bool:
        """Record a failure; True when this one opened the breaker."""
        with self._mutex:
            self._failures += 1
            self._trial_running = False
            if self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and self._failures >= self.threshold
            ):
                self._state = BreakerState.OPEN
                self._opened_at = self._clock()
                self.opened_count += 1
                return True
            return False
