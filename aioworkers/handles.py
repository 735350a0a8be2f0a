"""Following a job: `JobHandle` (what ``enqueue`` returns, or ``app.job(id)`` makes from an
id in any process), its `JobInfo`, and the records written when a job is enqueued."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import orjson

from .errors import JobCancelled, JobFailed, ResultUnavailable
from .store.base import JobRecord, Store

Status = Literal[
    "queued", "delayed", "running", "retrying", "succeeded", "failed", "cancelled", "unknown"
]

# The ids `aioworkers.envelope.new_id` makes: 12 hex digits of epoch ms, 80 random bits.
_ID = re.compile(r"[0-9a-f]{32}")


class KeepsResults(Protocol):
    """What a handle needs of a registered task (`aioworkers.Task` is one)."""

    @property
    def result_ttl(self) -> float | None: ...


class HandleApp(Protocol):
    """What a handle needs of its `App` (a structural type: this module imports no app)."""

    @property
    def store(self) -> Store: ...

    @property
    def tasks(self) -> Mapping[str, KeepsResults]: ...

    @property
    def idempotency_ttl(self) -> float: ...


@dataclass(frozen=True, slots=True)
class JobInfo:
    """What the state store knows of a job (times in UTC; None: not yet, or not known)."""

    id: str
    task: str | None
    queue: str | None
    status: Status
    attempt: int | None = None
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error_type: str | None = None
    error: str | None = None


class JobHandle(str):
    """A job to follow: its ``id``, ``task`` and ``queue`` (None when made from an id
    alone, `App.job`), its `status`, `info` and `result`, and `cancel`.

    A handle *is* the job id (a ``str`` equal to it, hashed as it), so code that kept the
    id ``enqueue`` used to return goes on working: print it, store it, send it as JSON.
    Status and results are kept only for a task registered with ``result_ttl`` (see
    `aioworkers.App.task`); a handle of any other job answers ``"unknown"``.
    """

    id: str
    task: str | None
    queue: str | None

    def __new__(
        cls, job_id: str, *, app: HandleApp, task: str | None = None, queue: str | None = None
    ) -> JobHandle:
        handle = super().__new__(cls, job_id)
        handle.id = job_id
        handle.task = task
        handle.queue = queue
        handle._app = app
        return handle

    _app: HandleApp

    def __repr__(self) -> str:
        return f"<JobHandle {self.task or '?'} {self.id}>"

    def __reduce__(self) -> tuple[type[str], tuple[str]]:
        return (str, (self.id,))  # a copy is the id (the app does not travel)

    async def status(self) -> Status:
        """``"queued"``, ``"delayed"``, ``"running"``, ``"retrying"``, ``"succeeded"``,
        ``"failed"``, ``"cancelled"``, or ``"unknown"`` (no record: a task without
        ``result_ttl``, an unknown id, or one expired)."""
        record = await self._app.store.get_job(self.id)
        return "unknown" if record is None else record.status

    async def info(self) -> JobInfo:
        """The job's record as a `JobInfo` (status ``"unknown"`` if there is none)."""
        record = await self._app.store.get_job(self.id)
        if record is None:
            return JobInfo(self.id, self.task, self.queue, "unknown")
        return JobInfo(
            record.id,
            record.task,
            record.queue,
            record.status,
            record.attempt,
            _utc(record.enqueued_at),
            _utc(record.started_at),
            _utc(record.finished_at),
            record.error_type,
            record.error,
        )

    async def result(self, timeout: float | None = 10.0) -> Any:  # noqa: ASYNC109 (a store error inside is retried)
        """Wait for the job to end (at most ``timeout`` seconds; None: no limit) and return
        what its handler returned (decoded from JSON).

        Raises `aioworkers.JobFailed` if it was dead-lettered, `aioworkers.JobCancelled` if
        it was cancelled, ``TimeoutError`` after ``timeout``, and at once
        `aioworkers.ResultUnavailable` if its task keeps no results, the id is unknown, the
        record expired, or the return value could not be stored. A store outage during the
        wait is retried until the timeout."""
        task = self._app.tasks.get(self.task) if self.task is not None else None
        if task is not None and task.result_ttl is None:
            raise ResultUnavailable(
                f"task {self.task!r} keeps no results: register it with @app.task(result_ttl=...)"
            )
        record = await self._app.store.wait_job(self.id, timeout=timeout)
        if record is None:
            raise ResultUnavailable(
                f"no record of job {self.id}: an unknown id, a task without result_ttl, "
                "or its record expired"
            )
        return result_of(record)

    async def cancel(self) -> bool:
        """Cancel the job: True if it had not finished. Queued or delayed, it never starts;
        waiting for a retry, its next attempt never starts; running, it is cancelled at its
        next ``await`` within one lease interval (``visibility_timeout / 3``). A cancelled
        job is never retried or dead-lettered; its status is ``"cancelled"``.

        Without ``result_ttl`` nothing records whether the job has finished: the cancel
        mark is written and True returned even if the job ended already (the mark then
        affects nothing, and expires). An id that is not one of ours returns False, as
        does one without a record when its task (or, for a handle made from an id alone,
        every task of the app) keeps results."""
        store = self._app.store
        ttl = self._app.idempotency_ttl
        tasks = self._app.tasks
        if self.task is not None:
            known_only = _keeps_results(self._app, self.task)
        else:
            known_only = bool(tasks) and all(t.result_ttl is not None for t in tasks.values())
        if not known_only and await store.get_job(self.id) is not None:
            known_only = True
        if not known_only and _ID.fullmatch(self.id) is None:
            return False  # not an id aioworkers made, and no record: nothing to cancel
        return await store.mark_cancelled(self.id, ttl=ttl, known_only=known_only)


def _keeps_results(app: HandleApp, name: str) -> bool:
    task = app.tasks.get(name)
    return task is not None and task.result_ttl is not None


def result_of(record: JobRecord) -> Any:
    """The result of a job that ended, or the error that says why there is none."""
    if record.status == "failed":
        raise JobFailed(
            record.id, record.error_type or "", record.error or "", record.traceback or ""
        )
    if record.status == "cancelled":
        raise JobCancelled(f"job {record.id} was cancelled")
    if record.result_error is not None:
        raise ResultUnavailable(f"job {record.id} succeeded, but {record.result_error}")
    if record.result is None:
        raise ResultUnavailable(f"job {record.id} succeeded, but its result is not stored")
    return orjson.loads(record.result)


def _utc(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


async def record_enqueued(store: Store, jobs: Sequence[tuple[JobHandle, float, float]]) -> None:
    """Write the records of ``jobs`` (handle, TTL, delay) just enqueued, before they are
    published, so a job is never "not found" before a worker saw it: a round trip a TTL."""
    now = datetime.now(UTC).timestamp()
    by_ttl: dict[float, list[JobRecord]] = defaultdict(list)
    for handle, ttl, delay in jobs:
        status: Literal["queued", "delayed"] = "delayed" if delay else "queued"
        by_ttl[ttl].append(
            JobRecord(handle.id, handle.task or "", handle.queue or "", status, enqueued_at=now)
        )
    for ttl, records in by_ttl.items():
        await store.put_jobs(records, ttl=ttl)


__all__ = ["JobHandle", "JobInfo", "Status", "record_enqueued", "result_of"]
