"""The tiers' task pool and the remote tier's resilience helpers (pure logic)."""

import threading

from lmcache_node.retry import RetryPolicy
from lmcache_node.tiers.resilience import BreakerState, CircuitBreaker
from lmcache_node.tiers.workers import Priority, TaskPool


def test_priorities_order_queued_work() -> None:
    pool = TaskPool("test", workers=1, max_pending=10)
    gate = threading.Event()
    order: list[str] = []
    pool.submit(Priority.PUT, gate.wait)  # occupies the only worker
    for name, priority in [
        ("put1", Priority.PUT),
        ("delete", Priority.DELETE),
        ("put2", Priority.PUT),
        ("prefetch", Priority.PREFETCH),
    ]:
        assert pool.submit(priority, lambda name=name: order.append(name))
    gate.set()
    assert pool.drain(10)
    assert order == ["prefetch", "delete", "put1", "put2"]
    pool.close()


def test_full_queue_refuses_puts_but_not_prefetches() -> None:
    pool = TaskPool("test", workers=1, max_pending=2)
    gate = threading.Event()
    pool.submit(Priority.PREFETCH, gate.wait)
    assert pool.submit(Priority.PUT, lambda: None)
    assert pool.submit(Priority.PUT, lambda: None)
    assert not pool.submit(Priority.PUT, lambda: None)
    assert pool.refused == 1
    assert pool.submit(Priority.PREFETCH, lambda: None)
    gate.set()
    assert pool.drain(10)
    pool.close()
    assert not pool.submit(Priority.PUT, lambda: None)  # closed


def test_failing_task_does_not_kill_the_worker() -> None:
    pool = TaskPool("test", workers=1, max_pending=4)
    done = threading.Event()

    def boom() -> None:
        raise RuntimeError("task bug")

    pool.submit(Priority.PUT, boom)
    pool.submit(Priority.PUT, done.set)
    assert done.wait(10)
    assert pool.failed == 1
    pool.close()


def test_retry_delays_are_bounded_and_grow() -> None:
    policy = RetryPolicy(attempts=4, base_s=0.1, cap_s=0.3)
    assert list(policy.delays(rng=lambda: 1.0)) == [0.1, 0.2, 0.3]
    assert list(RetryPolicy(attempts=1).delays()) == []


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_then_lets_one_trial_through() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=2, cooldown_secs=5, clock=clock)
    assert breaker.allow()
    assert not breaker.failed()
    assert breaker.failed()  # second failure opens it
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    clock.now = 5.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()  # one trial at a time
    assert breaker.failed()  # the trial failed: open again
    assert not breaker.allow()
    clock.now = 10.0
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.opened_count == 2
