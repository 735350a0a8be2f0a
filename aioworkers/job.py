"""The job a handler is running, reachable with `current_job()`."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from .errors import AioworkersError

if TYPE_CHECKING:
    from .envelope import Envelope


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
    snoozes: int = 0  # times this job snoozed (`aioworkers.Snooze`); attempts are unchanged

    def __repr__(self) -> str:
        return f"<Job {self.task} {self.id} attempt={self.attempt}>"

    @property
    def schedule(self) -> str | None:
        """The name of the periodic schedule that enqueued this job, or None."""
        return self.headers.get("aioworkers-schedule")

    @property
    def scheduled_for(self) -> datetime | None:
        """The slot a periodic job was enqueued for (an aware UTC datetime), or None."""
        slot = self.headers.get("aioworkers-scheduled-for")
        if slot is None or not slot.isdigit() or len(slot) > 15:
            return None
        return from_epoch_ms(int(slot))

    async def complete_in(self, conn: object) -> None:
        """Complete this job's idempotency key inside ``conn``'s open transaction (an
        asyncpg connection, or SQLAlchemy's ``AsyncConnection``/``AsyncSession`` on
        asyncpg), with the PostgreSQL store: the key is done exactly when the transaction
        commits, so the job's writes in it happen once (README, "PostgreSQL"). For a task
        registered with ``idempotent=True``; the worker then completes the key no more."""
        from ._runtime.completion import completion_var

        completion = completion_var.get()
        if completion is None or completion.job_id != self.id:
            raise AioworkersError(
                "complete_in() needs an idempotent task (idempotent=True) run by a worker"
            )
        await completion.commit_in(conn)


class Pending:
    """The facts of the job a run holds, made into a `Job` when first asked for: most
    handlers never ask, and a frozen dataclass costs microseconds to build."""

    __slots__ = ("_count", "_env", "_job", "_queue")

    def __init__(self, env: Envelope, queue: str, count: int) -> None:
        self._env = env
        self._queue = queue
        self._count = count
        self._job: Job | None = None

    def job(self) -> Job:
        if self._job is None:
            env = self._env
            self._job = Job(
                id=env.id,
                task=env.task,
                attempt=env.attempt,
                queue=self._queue,
                key=env.key,
                enqueued_at=from_epoch_ms(env.enqueued_at),
                delivery_count=self._count,
                headers=env.headers,
                snoozes=env.snoozes,
            )
        return self._job


_current: ContextVar[Job | Pending] = ContextVar("aioworkers_current_job")


def running_job() -> Job | None:
    """The job the caller runs in, or None outside one."""
    value = _current.get(None)
    return value.job() if type(value) is Pending else value  # type: ignore[return-value]


def current_job() -> Job:
    """The job being run by the calling handler; raises outside a worker."""
    job = running_job()
    if job is None:
        raise AioworkersError("current_job() called outside a job run by a worker")
    return job


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def from_epoch_ms(ms: int) -> datetime:
    """The UTC time of epoch milliseconds, exact to the millisecond; `decode` checks that
    ``ms`` is in range (``0`` to `aioworkers.envelope.MAX_EPOCH_MS`)."""
    return _EPOCH + timedelta(milliseconds=ms)
