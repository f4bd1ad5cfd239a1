"""Shared test support: bounded waits on conditions and fake clocks (docs/testing.md)."""

from tests.support.clock import FakeClock
from tests.support.metrics import sample, total
from tests.support.waiting import WaitTimeoutError, wait_until, wait_until_async

__all__ = ["FakeClock", "WaitTimeoutError", "sample", "total", "wait_until", "wait_until_async"]
