"""The retry/backoff policy (lmcache_node.retry) and the operator's copy of it."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from lmcache_node.retry import RetryPolicy
from lmcache_operator import retry as operator_retry


def test_delays_grow_by_the_factor_up_to_the_cap() -> None:
    policy = RetryPolicy(base_s=0.1, cap_s=0.5, jitter=False, attempts=6)
    assert list(policy.delays()) == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert [policy.delay(n) for n in (0, 1, 2, 3)] == pytest.approx([0.1, 0.1, 0.2, 0.4])


def test_full_jitter_scales_each_delay_by_the_draw() -> None:
    policy = RetryPolicy(base_s=0.1, cap_s=1.0, attempts=4)
    assert list(policy.delays(rng=lambda: 0.5)) == pytest.approx([0.05, 0.1, 0.2])
    assert list(policy.delays(rng=lambda: 0.0)) == [0.0, 0.0, 0.0]


def test_attempts_count_every_try() -> None:
    assert list(RetryPolicy(attempts=1).delays()) == []
    assert len(list(RetryPolicy(attempts=3).delays())) == 2


def test_unlimited_policies_never_run_out() -> None:
    fixed = RetryPolicy.fixed(2.0)
    assert list(itertools.islice(fixed.delays(), 5)) == [2.0] * 5
    forever = RetryPolicy.forever(base_s=0.05, cap_s=2.0)
    waits = list(itertools.islice(forever.delays(), 10))
    assert waits[0] == 0.05 and waits[-1] == 2.0 and waits == sorted(waits)
    assert forever.delay(10_000) == 2.0  # no overflow after a long outage


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"base_s": -1.0}, "base_s"),
        ({"base_s": 2.0, "cap_s": 1.0}, "cap_s"),
        ({"factor": 0.5}, "factor"),
        ({"attempts": 0}, "attempts"),
    ],
)
def test_a_policy_that_cannot_work_is_refused(fields: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**fields)  # type: ignore[arg-type]


def test_the_operator_copy_has_the_same_shape_and_behaviour() -> None:
    theirs = operator_retry.RetryPolicy
    assert [f.name for f in dataclasses.fields(theirs)] == [
        f.name for f in dataclasses.fields(RetryPolicy)
    ]
    for fields in ({}, {"jitter": False, "attempts": 7}, {"base_s": 1.0, "cap_s": 60.0}):
        ours, copy = RetryPolicy(**fields), theirs(**fields)  # type: ignore[arg-type]
        assert list(ours.delays(rng=lambda: 0.7)) == list(copy.delays(rng=lambda: 0.7))
    assert list(itertools.islice(operator_retry.WATCH.delays(), 6)) == [0.5, 1, 2, 4, 8, 10]
    assert operator_retry.REQUEUE.delay(1) == 2.0
