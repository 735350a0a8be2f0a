"""What happened to one delivery, as values: the outcome names, the decisions the settle
step applies, and the `Outcome` the executor returns.

Nothing here raises or is raised: a decision is data, made by `policy` and carried out by
`settle`. This module sits low (it imports no runtime step, no app, task or telemetry), so
every layer can name outcomes the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from ..envelope import Envelope
    from ..store.base import JobFinish


class OutcomeName(StrEnum):
    """What a delivery is counted as once the runtime is done with it."""

    OK = "ok"  # the handler returned; acked
    RETRIED = "retried"  # failed; the next attempt published with a backoff
    DEAD = "dead"  # in the dead-letter queue
    RELEASED = "released"  # handed back unfinished (shutdown), visible again at once
    LEASE_LOST = "lease_lost"  # another worker owns it now: settled by nobody here
    DUPLICATE = "duplicate"  # its idempotency key is done: acked without running
    DEFERRED = "deferred"  # could not start (key busy, store down): same attempt later
    CANCELLED = "cancelled"  # cancelled by a user (later in this wave)
    SNOOZED = "snoozed"  # the handler asked to run again later (later in this wave)
    THROTTLED = "throttled"  # a concurrency or rate limit held it back: same attempt later


# The one tuple of every outcome name, in the order summaries list them.
OUTCOMES: tuple[OutcomeName, ...] = tuple(OutcomeName)


class TaskInfo(Protocol):
    """What an outcome says of its task (a structural type: the runtime imports no `Task`)."""

    @property
    def name(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledge: the job is done (``name`` OK), or was done before (DUPLICATE)."""

    name: OutcomeName = OutcomeName.OK


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Publish the next attempt after ``delay`` seconds."""

    delay: float
    name: ClassVar[OutcomeName] = OutcomeName.RETRIED


@dataclass(frozen=True, slots=True)
class Dead:
    """Dead-letter the job for ``reason`` (one of a closed set: ``max_retries``,
    ``rejected``, ``max_deliveries``, or a decode reason). Not named ``DeadLetter``: that
    is the DLQ record it writes (`aioworkers.brokers.DeadLetter`)."""

    reason: str
    name: ClassVar[OutcomeName] = OutcomeName.DEAD


@dataclass(frozen=True, slots=True)
class Release:
    """Hand the delivery back unfinished, visible again at once."""

    name: ClassVar[OutcomeName] = OutcomeName.RELEASED


@dataclass(frozen=True, slots=True)
class Defer:
    """Publish the job again after ``delay`` with the same attempt: this one did not count."""

    delay: float
    name: ClassVar[OutcomeName] = OutcomeName.DEFERRED


@dataclass(frozen=True, slots=True)
class Snoozed:
    """The handler asked to run again after ``delay``: same attempt, one more snooze."""

    delay: float
    name: ClassVar[OutcomeName] = OutcomeName.SNOOZED


@dataclass(frozen=True, slots=True)
class Throttle(Defer):
    """A limit held the job back (or the handler raised `RateLimited`): published again
    after ``delay`` with the same attempt, settled as a `Defer`, counted as throttled."""

    name: ClassVar[OutcomeName] = OutcomeName.THROTTLED


Decision = Ack | RetryLater | Dead | Release | Defer | Snoozed
ACK = Ack()
DUPLICATE = Ack(OutcomeName.DUPLICATE)
# Cancelled by a user: acked, never retried or dead-lettered.
CANCELLED = Ack(OutcomeName.CANCELLED)
RELEASE = Release()


@dataclass(slots=True)
class Outcome:
    """What the executor made of one delivery: the ``decision`` to settle it with, the
    handler's ``error`` if it raised one (or the `DecodeError` of a message that cannot
    run), and ``detail``, why a decision was taken without an error (a busy key, too many
    deliveries), for logs and the dead letter."""

    envelope: Envelope | None
    task: TaskInfo | None
    decision: Decision
    error: BaseException | None = None
    duration: float = 0.0  # seconds the handler ran; 0 if it did not run
    started_at: float = 0.0  # when it started, epoch seconds
    detail: str = ""
    value: object = None  # what the handler returned (kept for tasks with results)
    # The final records its ack carries (a worker's task with results: `Records.batched`).
    finishes: list[JobFinish] | None = None
