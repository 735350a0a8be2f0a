"""Every decision about a delivery, as pure functions of values: the gates before a job
starts, the idempotency claim's answer, and what a handler's result means under its task's
`Policy`. Tested as a table (tests/unit/test_policy.py)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DecodeError, RateLimited, Reject, Retry, Snooze
from ..idempotency.base import ClaimResult
from .outcome import ACK, DUPLICATE, RELEASE, Dead, Decision, Defer, RetryLater, Snoozed, Throttle

# A job whose key is busy, or whose store is unreachable, comes back after a pause of
# about a third of the lease (how often a claim is extended), and never more than this.
MAX_DEFER = 5.0

MAX_DELIVERIES = Dead("max_deliveries")
REJECTED = Dead("rejected")
MAX_RETRIES = Dead("max_retries")
MAX_SNOOZES = Dead("max_snoozes")


@dataclass(frozen=True, slots=True)
class Policy:
    """How failures of a task are retried. The defaults ride out a downstream outage of
    21 minutes at least (README, "Retries"): 8 retries, the pause before attempt n+1
    uniform in ``[c / 2, c]``, ``c = min(max_backoff, backoff * 2 ** (n - 1))``."""

    retries: int = 8
    backoff: float = 10.0
    max_backoff: float = 3600.0
    timeout: float | None = None
    max_snoozes: int = 100


DEFAULT_POLICY = Policy()


def next_delay(
    attempt: int,
    *,
    base: float = 1.0,
    cap: float = 3600.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before the attempt after ``attempt`` (1-based).

    Full jitter: uniform in ``[0, min(cap, base * 2 ** (attempt - 1))]``, so retries of many
    jobs that failed together spread out instead of stampeding the dependency again.
    """
    # min() before the power would overflow float for absurd attempts; clamp the exponent.
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 64))
    return ceiling * rand()


def before_start(count: int, max_deliveries: int, cancelled: bool) -> Decision | None:
    """The gates of a job that can run, checked before it starts: None lets it start.

    The delivery count first, so a job that kills its process reaches the DLQ instead of
    looping; a job the runtime cancelled before it started is handed back.
    """
    if count > max_deliveries:
        return MAX_DELIVERIES
    if cancelled:
        return RELEASE
    return None


def defer(lease: float, rand: Callable[[], float] = random.random) -> Defer:
    """Run the same attempt again later: its key is busy or its store unreachable."""
    pause = min(lease / 3, MAX_DEFER)
    # Jittered, so jobs waiting on one key or one store do not come back in lockstep.
    return Defer(pause * (0.5 + rand() / 2))


def after_claim(
    state: ClaimResult,
    lease: float,
    rand: Callable[[], float] = random.random,
) -> Decision | None:
    """What the idempotency claim of a job's key means: None runs it (claimed)."""
    if state == "done":
        return DUPLICATE
    if state == "busy":
        return defer(lease, rand)
    return None


def classify(
    error: BaseException | None,
    attempt: int,
    policy: Policy,
    rand: Callable[[], float] = random.random,
    *,
    snoozes: int = 0,
) -> Decision:
    """What attempt ``attempt`` (1-based) means when its handler ended with ``error``
    (None: it returned), or when the message could not run (a `DecodeError`). ``snoozes``:
    how many times the job snoozed before (a `Snooze` uses no attempt)."""
    if error is None:
        return ACK
    if isinstance(error, Snooze):
        return MAX_SNOOZES if snoozes >= policy.max_snoozes else Snoozed(max(0.0, error.delay))
    if isinstance(error, RateLimited):  # a limit, not a failure: no attempt used
        return Throttle(max(0.0, error.retry_after))
    if isinstance(error, DecodeError):
        return Dead(error.reason)
    if isinstance(error, Reject):
        return REJECTED
    if attempt > policy.retries:
        return MAX_RETRIES
    if isinstance(error, Retry) and error.delay is not None:
        return RetryLater(max(0.0, error.delay))
    return RetryLater(retry_delay(attempt, policy, rand))


def retry_delay(attempt: int, policy: Policy, rand: Callable[[], float] = random.random) -> float:
    """The pause before the attempt after ``attempt`` (1-based): uniform in the upper
    half of the exponential ceiling. The lower half is left out so that the retries of a
    job span a known time at least (the outage they survive), and the upper half still
    spreads jobs that failed together."""
    ceiling = next_delay(attempt, base=policy.backoff, cap=policy.max_backoff, rand=_one)
    return ceiling * (0.5 + rand() / 2)


def _one() -> float:
    return 1.0
