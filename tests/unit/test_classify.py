"""`classify` as a table: (error, attempt, policy) -> decision."""

from __future__ import annotations

import pytest

from aioworkers._runtime.classify import (
    Ack,
    DeadLetter,
    Decision,
    Defer,
    Deferred,
    Duplicate,
    JobCancelled,
    Release,
    RetryLater,
    TooManyDeliveries,
    classify,
)
from aioworkers.errors import DecodeError, Reject, Retry
from aioworkers.task import Policy

# retries=3: attempts 1..3 may retry, attempt 4 is the last. backoff 2 s doubling, cap 60 s.
POLICY = Policy(retries=3, backoff=2.0, max_backoff=60.0)
NO_RETRIES = Policy(retries=0, backoff=2.0, max_backoff=60.0)
MANY_RETRIES = Policy(retries=20, backoff=2.0, max_backoff=60.0)


def ceiling() -> float:
    """A `rand` that makes the full-jitter delay its ceiling."""
    return 1.0


CASES = [
    # success
    pytest.param(None, 1, POLICY, Ack(), id="ok"),
    pytest.param(None, 4, POLICY, Ack(), id="ok-on-last-attempt"),
    pytest.param(None, 99, POLICY, Ack(), id="ok-past-retries"),
    # cancelled runs are handed back, whatever the attempt
    pytest.param(JobCancelled(), 1, POLICY, Release(), id="cancelled"),
    pytest.param(JobCancelled(), 4, POLICY, Release(), id="cancelled-last-attempt"),
    pytest.param(JobCancelled(), 1, NO_RETRIES, Release(), id="cancelled-no-retries"),
    # idempotency: a done key is acked (counted as a duplicate); a busy key or an unreachable
    # store defers the same attempt, so retries spent or none, it never dead-letters
    pytest.param(Duplicate(), 1, POLICY, Ack("duplicate"), id="duplicate"),
    pytest.param(Duplicate(), 9, NO_RETRIES, Ack("duplicate"), id="duplicate-past-retries"),
    pytest.param(Deferred(0.5, "busy"), 1, POLICY, Defer(0.5), id="deferred"),
    pytest.param(Deferred(0.5, "busy"), 4, POLICY, Defer(0.5), id="deferred-last-attempt"),
    pytest.param(Deferred(0.5, "down"), 1, NO_RETRIES, Defer(0.5), id="deferred-no-retries"),
    # undecodable: dead at once with the decode reason, retries left or not
    *(
        pytest.param(DecodeError(r, "detail"), 1, MANY_RETRIES, DeadLetter(r), id=f"decode-{r}")
        for r in sorted(DecodeError.REASONS)
    ),
    # poison: delivered too often
    pytest.param(TooManyDeliveries("6"), 1, MANY_RETRIES, DeadLetter("max_deliveries"), id="tmd"),
    # Reject dead-letters at once, whatever its own reason
    pytest.param(Reject(), 1, MANY_RETRIES, DeadLetter("rejected"), id="reject"),
    pytest.param(Reject("bad input"), 1, POLICY, DeadLetter("rejected"), id="reject-reason"),
    # exceptions retry with backoff (ceiling of full jitter: 2 * 2 ** (attempt - 1))
    pytest.param(ValueError("x"), 1, POLICY, RetryLater(2.0), id="error-attempt-1"),
    pytest.param(ValueError("x"), 2, POLICY, RetryLater(4.0), id="error-attempt-2"),
    pytest.param(ValueError("x"), 3, POLICY, RetryLater(8.0), id="error-attempt-3-last-retry"),
    pytest.param(ValueError("x"), 4, POLICY, DeadLetter("max_retries"), id="error-retries-spent"),
    pytest.param(ValueError("x"), 5, POLICY, DeadLetter("max_retries"), id="error-past-retries"),
    pytest.param(ValueError("x"), 6, MANY_RETRIES, RetryLater(60.0), id="error-backoff-capped"),
    pytest.param(KeyError("k"), 1, POLICY, RetryLater(2.0), id="keyerror"),
    # timeouts are failures like any other
    pytest.param(TimeoutError("slow"), 1, POLICY, RetryLater(2.0), id="timeout"),
    pytest.param(TimeoutError("slow"), 4, POLICY, DeadLetter("max_retries"), id="timeout-spent"),
    # Retry(delay) overrides the backoff; Retry() uses it
    pytest.param(Retry(delay=5), 1, POLICY, RetryLater(5.0), id="retry-delay"),
    pytest.param(Retry(delay=5), 3, POLICY, RetryLater(5.0), id="retry-delay-last-retry"),
    pytest.param(Retry(delay=0), 1, POLICY, RetryLater(0.0), id="retry-delay-zero"),
    pytest.param(Retry(delay=-1), 1, POLICY, RetryLater(0.0), id="retry-negative-delay"),
    pytest.param(Retry(delay=500), 1, POLICY, RetryLater(500.0), id="retry-delay-over-cap"),
    pytest.param(Retry(), 1, POLICY, RetryLater(2.0), id="retry-backoff"),
    pytest.param(Retry(), 3, POLICY, RetryLater(8.0), id="retry-backoff-3"),
    pytest.param(Retry(delay=5), 4, POLICY, DeadLetter("max_retries"), id="retry-spent"),
    pytest.param(Retry(), 4, POLICY, DeadLetter("max_retries"), id="retry-backoff-spent"),
    # retries=0: the first failure is final
    pytest.param(ValueError("x"), 1, NO_RETRIES, DeadLetter("max_retries"), id="no-retries"),
    pytest.param(Retry(delay=1), 1, NO_RETRIES, DeadLetter("max_retries"), id="no-retries-retry"),
    pytest.param(TimeoutError(), 1, NO_RETRIES, DeadLetter("max_retries"), id="no-retries-timeout"),
]


@pytest.mark.parametrize(("error", "attempt", "policy", "expected"), CASES)
def test_classify(
    error: BaseException | None, attempt: int, policy: Policy, expected: Decision
) -> None:
    assert classify(error, attempt, policy, ceiling) == expected


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_backoff_delay_is_jittered_between_zero_and_the_ceiling(attempt: int) -> None:
    low = classify(ValueError(), attempt, POLICY, lambda: 0.0)
    mid = classify(ValueError(), attempt, POLICY, lambda: 0.25)
    assert low == RetryLater(0.0)
    assert mid == RetryLater(0.25 * 2.0 * 2 ** (attempt - 1))


def test_backoff_uses_random_jitter_by_default() -> None:
    delays = set()
    for _ in range(50):
        decision = classify(ValueError(), 3, POLICY)
        assert isinstance(decision, RetryLater)
        assert 0.0 <= decision.delay <= 8.0
        delays.add(decision.delay)
    assert len(delays) > 1


def test_zero_backoff_retries_at_once() -> None:
    policy = Policy(retries=2, backoff=0.0)
    assert classify(RuntimeError(), 1, policy, ceiling) == RetryLater(0.0)
    assert classify(RuntimeError(), 3, policy, ceiling) == DeadLetter("max_retries")
