"""The one backoff rule every reconnect loop uses (instruments, historian, clients)."""

from __future__ import annotations

import pytest

from labctl.backoff import Backoff


def test_doubles_to_a_ceiling_and_counts_attempts():
    b = Backoff(0.25, 2.0)
    assert [b.next() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert b.attempt == 6


def test_a_success_starts_again_from_the_minimum():
    b = Backoff(0.5, 30.0)
    b.next(), b.next(), b.next()
    b.reset()
    assert b.attempt == 0 and b.delay_s == 0.5
    assert b.next() == 0.5 and b.attempt == 1


def test_the_next_delay_can_be_read_without_counting():
    b = Backoff(1.0, 5.0, attempt=2)
    assert b.delay_s == 4.0 and b.attempt == 2
    assert b.next() == 4.0 and b.delay_s == 5.0


def test_thousands_of_failures_stay_at_the_maximum():
    b = Backoff(0.5, 10.0)
    delays = [b.next() for _ in range(5000)]
    assert delays[-1] == 10.0 and max(delays) == 10.0 and b.attempt == 5000


def test_equal_bounds_give_a_constant_delay():
    b = Backoff(1.5, 1.5)
    assert [b.next() for _ in range(3)] == [1.5, 1.5, 1.5]


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0), (float("nan"), 1.0)])
def test_nonsense_bounds_are_refused(low, high):
    with pytest.raises(ValueError, match="backoff"):
        Backoff(low, high)
