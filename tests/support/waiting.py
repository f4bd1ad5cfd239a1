"""The one bounded wait of the test suites: poll a condition, fail naming what was awaited.

``wait_until(predicate, timeout, what)`` calls ``predicate`` until it returns something
truthy and returns that value. After ``timeout`` seconds it raises ``WaitTimeoutError`` (an
AssertionError) that says what it waited for, for how long, and the last value seen (or
the last exception the predicate raised). Never a fixed sleep where a condition can be
awaited instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeoutError(AssertionError):
    """A bounded wait ran out; the message names what was awaited and the last value."""


def _timed_out(
    what: str, timeout: float, last: object, error: BaseException | None
) -> WaitTimeoutError:
    seen = f"last error: {error!r}" if error is not None else f"last value: {last!r}"
    return WaitTimeoutError(f"timed out after {timeout:g} s waiting for {what}; {seen}")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.1,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` every ``interval`` s until it is truthy (its value is returned).

    ``ignore``: exceptions that count as "not yet" (a server still starting); others fail
    the wait at once.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    error: BaseException | None = None
    while True:
        try:
            last = predicate()
            error = None
            if last:
                return last
        except ignore as exc:
            error = exc
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last, error)
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
) -> T:
    """``wait_until`` inside an event loop: the predicate may be a coroutine function."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        value = predicate()
        last = await value if isinstance(value, Awaitable) else value
        if last:
            return last
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last, None)
        await asyncio.sleep(interval)
