"""The policy as tables: every decision about a delivery is a pure function of values.

- `before_start`: (delivery count, max_deliveries, cancelled) -> decision or None (start)
- `after_claim`: (idempotency claim state, lease) -> decision or None (run)
- `classify`: (error, attempt, policy) -> decision
"""

from __future__ import annotations

import pytest

from aioworkers._runtime.outcome import (
    Ack,
    Dead,
    Decision,
    Defer,
    OutcomeName,
    Release,
    RetryLater,
)
from aioworkers._runtime.policy import (
    MAX_DEFER,
    Policy,
    after_claim,
    before_start,
    classify,
    defer,
)
from aioworkers.errors import DecodeError, Reject, Retry
from aioworkers.idempotency.base import ClaimResult

# retries=3: attempts 1..3 may retry, attempt 4 is the last. backoff 2 s doubling, cap 60 s.
POLICY = Policy(retries=3, backoff=2.0, max_backoff=60.0)
NO_RETRIES = Policy(retries=0, backoff=2.0, max_backoff=60.0)
MANY_RETRIES = Policy(retries=20, backoff=2.0, max_backoff=60.0)


def ceiling() -> float:
    """A `rand` that makes the full-jitter delay its ceiling."""
    return 1.0


BEFORE_START = [
    # (count, max_deliveries, cancelled) -> decision; None starts the job
    pytest.param(1, 5, False, None, id="first-delivery"),
    pytest.param(5, 5, False, None, id="last-allowed-delivery"),
    # poison: delivered too often (it keeps killing its worker), checked before dispatch
    pytest.param(6, 5, False, Dead("max_deliveries"), id="too-many-deliveries"),
    pytest.param(2, 1, False, Dead("max_deliveries"), id="max-deliveries-1"),
    # cancelled by the runtime before it started (shutdown, lease lost): handed back
    pytest.param(1, 5, True, Release(), id="cancelled-before-start"),
    # the poison check comes first: a cancel must not hand a poison job back forever
    pytest.param(6, 5, True, Dead("max_deliveries"), id="poison-and-cancelled"),
]


@pytest.mark.parametrize(("count", "most", "cancelled", "expected"), BEFORE_START)
def test_before_start(count: int, most: int, cancelled: bool, expected: Decision | None) -> None:
    assert before_start(count, most, cancelled) == expected


AFTER_CLAIM = [
    # (state, lease) -> decision; None runs the job under its claim. A done key is acked
    # unrun (counted as a duplicate); a busy key defers the same attempt for about a third
    # of the lease (never over MAX_DEFER), so it never uses a retry nor dead-letters.
    pytest.param("claimed", 30.0, None, id="claimed"),
    pytest.param("done", 30.0, Ack(OutcomeName.DUPLICATE), id="done"),
    pytest.param("busy", 3.0, Defer(1.0), id="busy"),
    pytest.param("busy", 30.0, Defer(MAX_DEFER), id="busy-long-lease-capped"),
]


@pytest.mark.parametrize(("state", "lease", "expected"), AFTER_CLAIM)
def test_after_claim(state: ClaimResult, lease: float, expected: Decision | None) -> None:
    assert after_claim(state, lease, ceiling) == expected


@pytest.mark.parametrize("rand", [0.0, 0.5, 1.0])
def test_defer_is_jittered_in_the_upper_half_of_its_pause(rand: float) -> None:
    assert defer(3.0, lambda: rand) == Defer(1.0 * (0.5 + rand / 2))


def test_decisions_name_the_outcome_they_count_as() -> None:
    assert Ack().name == "ok"
    assert Ack(OutcomeName.DUPLICATE).name == "duplicate"
    assert RetryLater(1.0).name == "retried"
    assert Dead("rejected").name == "dead"
    assert Release().name == "released"
    assert Defer(1.0).name == "deferred"


CASES = [
    # success
    pytest.param(None, 1, POLICY, Ack(), id="ok"),
    pytest.param(None, 4, POLICY, Ack(), id="ok-on-last-attempt"),
    pytest.param(None, 99, POLICY, Ack(), id="ok-past-retries"),
    # undecodable: dead at once with the decode reason, retries left or not
    *(
        pytest.param(DecodeError(r, "detail"), 1, MANY_RETRIES, Dead(r), id=f"decode-{r}")
        for r in sorted(DecodeError.REASONS)
    ),
    # Reject dead-letters at once, whatever its own reason
    pytest.param(Reject(), 1, MANY_RETRIES, Dead("rejected"), id="reject"),
    pytest.param(Reject("bad input"), 1, POLICY, Dead("rejected"), id="reject-reason"),
    # exceptions retry with backoff (ceiling of full jitter: 2 * 2 ** (attempt - 1))
    pytest.param(ValueError("x"), 1, POLICY, RetryLater(2.0), id="error-attempt-1"),
    pytest.param(ValueError("x"), 2, POLICY, RetryLater(4.0), id="error-attempt-2"),
    pytest.param(ValueError("x"), 3, POLICY, RetryLater(8.0), id="error-attempt-3-last-retry"),
    pytest.param(ValueError("x"), 4, POLICY, Dead("max_retries"), id="error-retries-spent"),
    pytest.param(ValueError("x"), 5, POLICY, Dead("max_retries"), id="error-past-retries"),
    pytest.param(ValueError("x"), 6, MANY_RETRIES, RetryLater(60.0), id="error-backoff-capped"),
    pytest.param(KeyError("k"), 1, POLICY, RetryLater(2.0), id="keyerror"),
    # timeouts are failures like any other
    pytest.param(TimeoutError("slow"), 1, POLICY, RetryLater(2.0), id="timeout"),
    pytest.param(TimeoutError("slow"), 4, POLICY, Dead("max_retries"), id="timeout-spent"),
    # Retry(delay) overrides the backoff; Retry() uses it
    pytest.param(Retry(delay=5), 1, POLICY, RetryLater(5.0), id="retry-delay"),
    pytest.param(Retry(delay=5), 3, POLICY, RetryLater(5.0), id="retry-delay-last-retry"),
    pytest.param(Retry(delay=0), 1, POLICY, RetryLater(0.0), id="retry-delay-zero"),
    pytest.param(Retry(delay=500), 1, POLICY, RetryLater(500.0), id="retry-delay-over-cap"),
    pytest.param(Retry(), 1, POLICY, RetryLater(2.0), id="retry-backoff"),
    pytest.param(Retry(), 3, POLICY, RetryLater(8.0), id="retry-backoff-3"),
    pytest.param(Retry(delay=5), 4, POLICY, Dead("max_retries"), id="retry-spent"),
    pytest.param(Retry(), 4, POLICY, Dead("max_retries"), id="retry-backoff-spent"),
    # retries=0: the first failure is final
    pytest.param(ValueError("x"), 1, NO_RETRIES, Dead("max_retries"), id="no-retries"),
    pytest.param(Retry(delay=1), 1, NO_RETRIES, Dead("max_retries"), id="no-retries-retry"),
    pytest.param(TimeoutError(), 1, NO_RETRIES, Dead("max_retries"), id="no-retries-timeout"),
]


@pytest.mark.parametrize(("error", "attempt", "policy", "expected"), CASES)
def test_classify(
    error: BaseException | None, attempt: int, policy: Policy, expected: Decision
) -> None:
    assert classify(error, attempt, policy, ceiling) == expected


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_backoff_delay_is_jittered_in_the_upper_half_of_the_ceiling(attempt: int) -> None:
    ceiling_of_attempt = 2.0 * 2 ** (attempt - 1)
    low = classify(ValueError(), attempt, POLICY, lambda: 0.0)
    mid = classify(ValueError(), attempt, POLICY, lambda: 0.5)
    assert low == RetryLater(ceiling_of_attempt / 2)
    assert mid == RetryLater(ceiling_of_attempt * 0.75)


def test_backoff_uses_random_jitter_by_default() -> None:
    delays = set()
    for _ in range(50):
        decision = classify(ValueError(), 3, POLICY)
        assert isinstance(decision, RetryLater)
        assert 4.0 <= decision.delay <= 8.0
        delays.add(decision.delay)
    assert len(delays) > 1


def test_zero_backoff_retries_at_once() -> None:
    policy = Policy(retries=2, backoff=0.0)
    assert classify(RuntimeError(), 1, policy, ceiling) == RetryLater(0.0)
    assert classify(RuntimeError(), 3, policy, ceiling) == Dead("max_retries")
