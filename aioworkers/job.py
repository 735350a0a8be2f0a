"""The job a handler is running, reachable with `current_job()`."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from .errors import AioworkersError


@dataclass(frozen=True, slots=True)
class Job:
    """What a handler may know about the job it runs."""

    id: str
    task: str
    attempt: int
    queue: str
    key: str | None
    enqueued_at: datetime
    delivery_count: int = 1
    headers: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<Job {self.task} {self.id} attempt={self.attempt}>"


_current: ContextVar[Job] = ContextVar("aioworkers_current_job")


def current_job() -> Job:
    """The job being run by the calling handler; raises outside a worker."""
    try:
        return _current.get()
    except LookupError:
        raise AioworkersError("current_job() called outside a job run by a worker") from None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def from_epoch_ms(ms: int) -> datetime:
    """The UTC time of epoch milliseconds, exact to the millisecond; `decode` checks that
    ``ms`` is in range (``0`` to `aioworkers.envelope.MAX_EPOCH_MS`)."""
    return _EPOCH + timedelta(milliseconds=ms)
