"""The one pure function that decides what the result of an attempt means."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DecodeError, Reject, Retry
from ..retry import next_delay
from ..task import Policy


class JobCancelled(Exception):
    """The run was cancelled (shutdown past grace, or lease lost): hand the job back."""


class TooManyDeliveries(Exception):
    """The message was delivered more often than allowed, e.g. it keeps killing workers."""


class Duplicate(Exception):
    """The job's idempotency key is done: acknowledge the job without running it."""


class Deferred(Exception):
    """The job could not start (its key is in progress elsewhere, or the store is
    unreachable): run the same attempt again after ``delay`` seconds."""

    def __init__(self, delay: float, why: str) -> None:
        super().__init__(why)
        self.delay = delay


@dataclass(frozen=True, slots=True)
class Ack:
    outcome: str = "ok"  # what the worker counts: "ok", or "duplicate" for a done key


@dataclass(frozen=True, slots=True)
class RetryLater:
    delay: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str


@dataclass(frozen=True, slots=True)
class Release:
    pass


@dataclass(frozen=True, slots=True)
class Defer:
    """Publish the job again after ``delay`` with the same attempt: this one did not count."""

    delay: float


Decision = Ack | RetryLater | DeadLetter | Release | Defer
ACK = Ack()
DUPLICATE = Ack("duplicate")
RELEASE = Release()


def classify(
    error: BaseException | None,
    attempt: int,
    policy: Policy,
    rand: Callable[[], float] = random.random,
) -> Decision:
    """Map the error of attempt ``attempt`` (1-based) to a decision under ``policy``."""
    if error is None:
        return ACK
    if isinstance(error, JobCancelled):
        return RELEASE
    if isinstance(error, Duplicate):
        return DUPLICATE
    if isinstance(error, Deferred):
        # Before the retry budget: a job that never ran has not used an attempt.
        return Defer(error.delay)
    if isinstance(error, DecodeError):
        return DeadLetter(error.reason)
    if isinstance(error, TooManyDeliveries):
        return DeadLetter("max_deliveries")
    if isinstance(error, Reject):
        return DeadLetter("rejected")
    if attempt > policy.retries:
        return DeadLetter("max_retries")
    if isinstance(error, Retry) and error.delay is not None:
        return RetryLater(max(0.0, error.delay))
    return RetryLater(next_delay(attempt, base=policy.backoff, cap=policy.max_backoff, rand=rand))
