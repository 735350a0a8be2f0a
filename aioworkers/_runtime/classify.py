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


@dataclass(frozen=True, slots=True)
class Ack:
    pass


@dataclass(frozen=True, slots=True)
class RetryLater:
    delay: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str


@dataclass(frozen=True, slots=True)
class Release:
    pass


Decision = Ack | RetryLater | DeadLetter | Release
ACK = Ack()
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
