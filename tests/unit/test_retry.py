"""`next_delay`: exponential backoff with full jitter."""

from __future__ import annotations

import math

import pytest

from aioworkers.retry import next_delay


def one() -> float:
    return 1.0


def zero() -> float:
    return 0.0


@pytest.mark.parametrize(
    ("attempt", "base", "cap", "ceiling"),
    [
        (1, 1.0, 3600.0, 1.0),
        (2, 1.0, 3600.0, 2.0),
        (3, 1.0, 3600.0, 4.0),
        (4, 1.0, 3600.0, 8.0),
        (11, 1.0, 3600.0, 1024.0),
        (12, 1.0, 3600.0, 2048.0),
        (13, 1.0, 3600.0, 3600.0),
        (1, 0.5, 10.0, 0.5),
        (3, 0.5, 10.0, 2.0),
        (5, 0.5, 10.0, 8.0),
        (6, 0.5, 10.0, 10.0),
        (2, 3.0, 5.0, 5.0),
        (1, 0.0, 10.0, 0.0),
        (9, 0.0, 10.0, 0.0),
        (1, 7.0, 0.0, 0.0),
        # attempts below 1 behave like the first
        (0, 1.0, 3600.0, 1.0),
        (-5, 1.0, 3600.0, 1.0),
    ],
)
def test_ceiling_doubles_from_base_and_stops_at_cap(
    attempt: int, base: float, cap: float, ceiling: float
) -> None:
    assert next_delay(attempt, base=base, cap=cap, rand=one) == ceiling
    assert next_delay(attempt, base=base, cap=cap, rand=zero) == 0.0


def test_jitter_scales_the_ceiling() -> None:
    assert next_delay(4, base=1.0, cap=100.0, rand=lambda: 0.5) == 4.0
    assert next_delay(4, base=1.0, cap=100.0, rand=lambda: 0.125) == 1.0


def test_defaults_are_one_second_doubling_capped_at_an_hour() -> None:
    assert next_delay(1, rand=one) == 1.0
    assert next_delay(5, rand=one) == 16.0
    assert next_delay(100, rand=one) == 3600.0


@pytest.mark.parametrize(
    "attempt", [65, 1_000, 10**6, 10**18, 2**200], ids=["65", "1e3", "1e6", "1e18", "2**200"]
)
def test_huge_attempts_do_not_overflow(attempt: int) -> None:
    assert next_delay(attempt, rand=one) == 3600.0
    assert next_delay(attempt, base=1.0, cap=math.inf, rand=one) == 2.0**64
    assert next_delay(attempt, base=1e300, cap=5.0, rand=one) == 5.0


def test_default_rand_stays_within_bounds_and_varies() -> None:
    delays = [next_delay(6, base=1.0, cap=100.0) for _ in range(200)]
    assert all(0.0 <= d <= 32.0 for d in delays)
    assert len(set(delays)) > 100
    # Full jitter, not "equal jitter": small delays are as likely as large ones.
    assert min(delays) < 16.0 < max(delays)
