"""Shared test support: bounded waits on conditions, fake clocks, stopped processes
(docs/testing.md)."""

from tests.support.clock import FakeClock
from tests.support.metrics import sample, total
from tests.support.processes import continue_process, stop_process
from tests.support.waiting import WaitTimeoutError, wait_until, wait_until_async

__all__ = [
    "FakeClock",
    "WaitTimeoutError",
    "continue_process",
    "sample",
    "stop_process",
    "total",
    "wait_until",
    "wait_until_async",
]
