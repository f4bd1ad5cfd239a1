"""The operator's retry/backoff policy: watch loops and work queues.

The same shape as the node's ``lmcache_node.retry`` (a copy: the operator never imports the
node, an import contract says so). A policy says how long to wait after the n-th consecutive
failure (exponential from ``base_s`` by ``factor``, capped at ``cap_s``, optionally with full
jitter), how many tries there are (``attempts``; ``None``: until the caller stops) and how
long all may take (``deadline_s``). Callers count their failures.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Waits between tries; ``delay(n)`` after ``n`` consecutive failures (n >= 1)."""

    base_s: float = 0.02
    cap_s: float = 0.5
    factor: float = 2.0
    jitter: bool = True  # full jitter: a uniform draw in [0, delay) (many clients, one server)
    attempts: int | None = 3  # tries in all, the first included; None: no limit
    deadline_s: float | None = 2.0  # all tries and waits together; None: no limit

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.cap_s < self.base_s or self.factor < 1:
            raise ValueError(
                f"a retry policy needs 0 <= base_s <= cap_s and factor >= 1, got base_s "
                f"{self.base_s}, cap_s {self.cap_s}, factor {self.factor}"
            )
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"attempts must be at least 1 (or None), got {self.attempts}")

    @classmethod
    def fixed(cls, period_s: float) -> RetryPolicy:
        """Try every ``period_s``, forever (a background reconnect)."""
        return cls(base_s=period_s, cap_s=period_s, factor=1.0, jitter=False, attempts=None,
                   deadline_s=None)  # fmt: skip

    @classmethod
    def forever(cls, base_s: float, cap_s: float) -> RetryPolicy:
        """Exponential from ``base_s`` to ``cap_s``, no jitter, forever."""
        return cls(base_s=base_s, cap_s=cap_s, jitter=False, attempts=None, deadline_s=None)

    def delay(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        """The wait after ``failures`` consecutive failures (``rng``: a draw in [0, 1))."""
        exponent = max(0, failures - 1)
        # capped before the power can overflow: factor**exponent grows without bound
        wait = self.cap_s if exponent > 64 else min(self.cap_s, self.base_s * self.factor**exponent)
        return wait * rng() if self.jitter else wait

    def delays(self, rng: Callable[[], float] = random.random) -> Iterator[float]:
        """The waits between tries: ``attempts - 1`` of them (endless when unlimited)."""
        failures = 1
        while self.attempts is None or failures < self.attempts:
            yield self.delay(failures, rng)
            failures += 1


# A watch that failed: list and watch again after 0.5, 1, 2, 4, 8, then every 10 s.
WATCH = RetryPolicy.forever(base_s=0.5, cap_s=10.0)
# A queued run that failed or met a conflict: run again in 2 s (level-based: no give-up).
REQUEUE = RetryPolicy.fixed(2.0)
