"""A clock the test moves by hand, for code that takes ``clock=`` (lock TTLs, breakers,
expiry): time-dependent behaviour tested without sleeping."""

from __future__ import annotations


class FakeClock:
    """Callable like ``time.monotonic``; ``advance(s)`` moves it forward."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a clock never goes back")
        self.now += seconds
        return self.now
