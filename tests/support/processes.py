"""Stop and continue a process for a test, waiting until the stop has taken effect.

``kill(pid, SIGSTOP)`` returns before the process stops: here its threads went on running
for milliseconds after the call, long enough to answer a request sent after it (5 of 100
tries; 0 of 120 with the wait). A test that relies on a silent process waits until every
thread shows stopped.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.support.waiting import wait_until


def _thread_states(pid: int) -> list[str]:
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue  # a thread that just exited
        states.append(stat.rsplit(")", 1)[1].split()[0])
    return states


def stop_process(pid: int, timeout_s: float = 10.0) -> None:
    """SIGSTOP ``pid`` and return once all its threads are stopped ("T")."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(
        lambda: all(state in ("T", "t") for state in _thread_states(pid)),
        timeout_s,
        f"process {pid} to stop after SIGSTOP",
        interval=0.005,
    )


def continue_process(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)
