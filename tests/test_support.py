"""The shared test support itself (tests/support): bounded waits and the fake clock."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.support import FakeClock, WaitTimeoutError, wait_until, wait_until_async


def test_wait_until_returns_the_first_truthy_value() -> None:
    values = iter([0, "", None, [3]])
    assert wait_until(lambda: next(values), 5, "a list", interval=0) == [3]


def test_a_timeout_names_what_was_awaited_and_the_last_value() -> None:
    counter = itertools.count()
    with pytest.raises(WaitTimeoutError, match=r"waiting for the answer; last value: 0") as info:
        wait_until(lambda: 0 * next(counter), 0.05, "the answer", interval=0.01)
    assert isinstance(info.value, AssertionError)
    assert next(counter) > 1  # it polled more than once


def test_ignored_errors_are_retried_and_reported() -> None:
    def flaky() -> int:
        raise ConnectionRefusedError("not yet")

    with pytest.raises(WaitTimeoutError, match=r"last error: ConnectionRefusedError"):
        wait_until(flaky, 0.05, "a server", interval=0.01, ignore=(ConnectionRefusedError,))
    with pytest.raises(ConnectionRefusedError):  # not ignored: fails at once
        wait_until(flaky, 5, "a server")


def test_async_wait_awaits_coroutine_predicates() -> None:
    calls = itertools.count()

    async def probe() -> int:
        return next(calls) >= 2

    assert asyncio.run(wait_until_async(probe, 5, "the third call", interval=0)) is True
    with pytest.raises(WaitTimeoutError, match="never"):
        asyncio.run(wait_until_async(lambda: False, 0.02, "never", interval=0.01))


def test_fake_clock_moves_only_forward_by_hand() -> None:
    clock = FakeClock(10.0)
    assert clock() == 10.0
    assert clock.advance(2.5) == 12.5 and clock() == 12.5
    with pytest.raises(ValueError, match="never goes back"):
        clock.advance(-1)
