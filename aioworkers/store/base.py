"""The state store protocol: everything the workers of an app share beyond the queue.

One store per app (`App.store`), on memory, SQLite or Redis, holds:

- **idempotency claims** (`IdempotencyStore`: ``claim``/``extend``/``complete``/``release``):
  a key claimed by one run (its ``owner`` token) for a lease, extended by the worker's
  heartbeat, then remembered as done for a TTL;
- **job records** (`JobRecord`): status, attempt, times, error and result bytes of a job,
  written at enqueue (`put_jobs`), on start and between attempts (`update_jobs`), and at
  the end (`finish_jobs`, batched with the acks); waited on with `wait_job`;
- **cancel marks**: `mark_cancelled`, read for all jobs in flight at once by `cancelled`;
- **schedule slots**: `claim_slot`, a (name, slot) claimed once (periodic jobs);
- **limit leases**: `acquire_lease` / `extend_leases` / `release_lease`, at most ``limit``
  live holders of a key (concurrency limits; a dead worker's leases lapse);
- **token buckets**: `take` (rate limits);
- **unique keys**: `hold_unique` / `free_unique`, one job per key;
- **the worker registry**: `put_worker` / `live_workers` / `forget_worker`, each live
  worker's own record (the dashboard's Workers page, ``aioworkers stats``).

Rules every backend keeps (the conformance suite, `aioworkers.testing.store_conformance`,
checks them): every operation is one atomic step; what has an owner (a claim, a lease, a
unique key) is changed only by that owner, so a worker that stalled past its lease never
acts over the one that came after it; a record that reached a final status (succeeded,
failed, cancelled) never changes again, except by `put_jobs` (a new enqueue of that id,
e.g. a dead letter replayed); everything expires (TTLs, leases), and expired state is
swept in bounded batches. Client errors are mapped to `StoreUnavailable` (transient: try
again) or `ConfigError` (fix the configuration).

Times in records are epoch seconds (floats) given by the caller; TTLs, leases and waits
are seconds measured by the store (the server's clock on Redis).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from ..errors import AioworkersError

ClaimResult = Literal["claimed", "done", "busy"]

JobStatus = Literal["queued", "delayed", "running", "retrying", "succeeded", "failed", "cancelled"]
FinalStatus = Literal["succeeded", "failed", "cancelled"]
STATUSES: tuple[JobStatus, ...] = (
    "queued",
    "delayed",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "cancelled",
)
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class StoreUnavailable(AioworkersError):
    """A transient store failure (connection lost, timeout): the runtime fails closed, runs
    nothing under the key and tries the job again later."""


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What the store knows of one job. ``result`` is the encoded return value (bytes the
    store does not read); ``result_error`` says why a succeeded job has no result (too
    large, not encodable). Times are epoch seconds."""

    id: str
    task: str
    queue: str
    status: JobStatus
    attempt: int = 1
    enqueued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    result: bytes | None = None
    result_error: str | None = None

    @property
    def final(self) -> bool:
        """True once the job succeeded, failed or was cancelled: the record never changes."""
        return self.status in FINAL


@dataclass(frozen=True, slots=True)
class JobUpdate:
    """A change to a job that has not ended (start, a retry waiting, a delay): each field
    that is not None is set; the record's TTL is set to ``ttl`` from now.

    ``expect``: the statuses the record may be in for the change to apply (None: any that
    is not final). A final ``status`` is refused (use `JobFinish`)."""

    id: str
    ttl: float
    status: JobStatus | None = None
    attempt: int | None = None
    started_at: float | None = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    expect: frozenset[JobStatus] | None = None

    def __post_init__(self) -> None:
        if self.status in FINAL:
            raise ValueError(f"a JobUpdate cannot end a job ({self.status}): use JobFinish")
        check_times(ttl=self.ttl)


@dataclass(frozen=True, slots=True)
class JobFinish:
    """The end of a job: its final ``status`` and outcome. The outcome fields (error_type,
    error, traceback, result, result_error) are *replaced*: those left None are cleared, so
    a job that failed once then succeeded shows no error. ``attempt``, if given, is set.
    ``task`` and ``queue`` are used only if the record is missing (it expired, or the store
    lost it), which a finish then creates, so a waiter still gets its answer."""

    id: str
    status: FinalStatus
    ttl: float
    finished_at: float
    task: str = ""
    queue: str = ""
    attempt: int | None = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    result: bytes | None = None
    result_error: str | None = None

    def __post_init__(self) -> None:
        if self.status not in FINAL:
            raise ValueError(f"a JobFinish ends a job: {self.status!r} is not a final status")
        check_times(ttl=self.ttl)


@dataclass(frozen=True, slots=True)
class Beat:
    """What one `Store.beat` found: the idempotency claims and limit leases no longer held
    by their owner, and which of the watched jobs carry a cancel mark."""

    lost_claims: list[tuple[str, str]] = field(default_factory=list)
    lost_leases: list[tuple[str, str]] = field(default_factory=list)
    cancelled: set[str] = field(default_factory=set)


@runtime_checkable
class IdempotencyStore(Protocol):
    """Where idempotency keys live: the part of the `Store` the idempotency of a task uses.

    A key is *claimed* by one run (its ``owner`` token) for a ``lease`` of seconds,
    extended by the worker's heartbeat; a claim that is not extended lapses, so a crashed
    worker's key frees itself. A key *done* is remembered for ``ttl`` seconds: a job with
    that key is acknowledged without running. Only the owner of a claim may extend,
    complete or release it."""

    async def claim(self, key: str, owner: str, *, lease: float) -> ClaimResult:
        """Claim ``key`` for ``owner`` for ``lease`` seconds if it is free: ``"claimed"``;
        ``"done"`` if a run completed it; ``"busy"`` if a live claim holds it (any owner)."""
        ...

    async def extend(
        self, claims: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        """Extend each claim ``(key, owner)`` to ``lease`` seconds from now; returns those
        no longer held by their owner (lapsed, released, or completed)."""
        ...

    async def complete(self, key: str, owner: str, *, ttl: float) -> bool:
        """Mark ``key`` done for ``ttl`` seconds if ``owner`` still holds it; False if not."""
        ...

    async def release(self, key: str, owner: str) -> bool:
        """Free ``key`` if ``owner`` still holds it, so a retry may claim it; False if not."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Store(IdempotencyStore, Protocol):
    """The app's state store: idempotency claims (above), and the following.

    **Job records.**
    ``put_jobs(records, ttl=)``: write each record whole (replacing any), kept ``ttl``
    seconds; a waiter of a replaced record waits for the new one. ``put_job``: one.
    ``get_job(id)``: the record, or None (unknown or expired).
    ``update_jobs(updates)``: apply each `JobUpdate` to a record that exists and is not
    final (and is in ``expect``, if given); returns, per update, the status the record had
    before (None: no record, nothing written). So a start that gets ``"cancelled"`` back
    knows the job was cancelled before it began. ``update_job``: one.
    ``finish_jobs(finishes)``: apply each `JobFinish` unless the record is already final
    (the first end wins: a cancel racing a success ends as exactly one of them); a missing
    record is created; wakes the job's waiters. Returns, per finish, the status before
    (None: it was created; a final status: nothing was written).
    ``wait_job(id, timeout=)``: the record once final (at once if it is); None at once if
    there is no record, or when it expires meanwhile; `TimeoutError` after ``timeout``
    seconds (None: no limit). Wakes on the finish (Redis: a blocking pop on a per-job
    notify list; memory and SQLite: in-process at once, across processes by a bounded
    poll). A `StoreUnavailable` during the wait is retried inside it, until the timeout.

    **Cancel marks.**
    ``mark_cancelled(id, ttl=)``: False, writing nothing, if the job's record is final.
    Otherwise marks the job cancelled for ``ttl`` seconds and returns True; a record that
    is queued, delayed or retrying becomes ``cancelled`` at once (final: waiters wake, a
    worker that fetches it later finds it so); a running one stays ``running`` (its worker
    sees the mark, stops it and finishes it). With no record (a task without results)
    the mark is still written (ids are unique, so it affects that job only), unless
    ``known_only``: then nothing is written and it returns False.
    ``cancelled(ids)``: the subset of ``ids`` with a live mark, in one round trip.

    **Schedule slots.** ``claim_slot(name, slot, ttl=)``: True for the first caller of
    this (name, slot) within ``ttl`` seconds, False for every other.

    **Limit leases.** ``acquire_lease(key, owner, limit=, lease=)``: True if ``owner``
    now holds one of at most ``limit`` leases of ``key`` for ``lease`` seconds (an owner
    that holds one already keeps it and has it extended); False if ``limit`` other owners
    hold live leases. ``extend_leases(held, lease=)``: extend each ``(key, owner)``;
    returns those no longer held (lapsed or released). ``release_lease(key, owner)``:
    free it; False if not held.

    **Token buckets.** ``take(key, rate=, per=, now=None)``: a bucket of ``rate`` tokens
    refilled at ``rate / per`` a second: takes one and returns 0.0, or takes none and
    returns the seconds until one is there. ``now`` (epoch seconds) replaces the store's
    clock (tests): give it on every call of a key or on none.

    **Unique keys.** ``hold_unique(key, job_id, ttl=)``: None if ``job_id`` now holds
    ``key`` for ``ttl`` seconds (again: its hold is renewed), else the id of the job that
    holds it. ``free_unique(key, job_id)``: free it if ``job_id`` holds it; False if not.

    **Worker registry.** ``put_worker(worker_id, info, ttl=)``: keep ``info`` (text the
    store does not read: `aioworkers._registry` writes JSON) for ``ttl`` seconds, replacing
    the last one; a worker beats it every few seconds. ``live_workers(limit=)``: the infos
    not lapsed nor forgotten, in the order their workers were first put (one that lapsed
    and comes back counts as new), at most ``limit``. ``forget_worker(worker_id)``: drop
    it (a worker that stops); False if there was none.

    **One heartbeat.** ``beat(lease=, claims=, leases=, watch=)``: `extend` the claims,
    `extend_leases` the leases and read the cancel marks of ``watch``, in one round trip
    where the backend allows; returns a `Beat`.
    """

    async def put_jobs(self, records: Sequence[JobRecord], *, ttl: float) -> None: ...

    async def put_job(self, record: JobRecord, *, ttl: float) -> None: ...

    async def get_job(self, job_id: str) -> JobRecord | None: ...

    async def update_jobs(self, updates: Sequence[JobUpdate]) -> list[JobStatus | None]: ...

    async def update_job(self, update: JobUpdate) -> JobStatus | None: ...

    async def finish_jobs(self, finishes: Sequence[JobFinish]) -> list[JobStatus | None]: ...

    async def wait_job(self, job_id: str, *, timeout: float | None) -> JobRecord | None: ...  # noqa: ASYNC109 (a store error inside is retried)

    async def mark_cancelled(
        self, job_id: str, *, ttl: float, known_only: bool = False
    ) -> bool: ...

    async def cancelled(self, job_ids: Collection[str]) -> set[str]: ...

    async def claim_slot(self, name: str, slot: str, *, ttl: float) -> bool: ...

    async def acquire_lease(self, key: str, owner: str, *, limit: int, lease: float) -> bool: ...

    async def extend_leases(
        self, held: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]: ...

    async def release_lease(self, key: str, owner: str) -> bool: ...

    async def take(self, key: str, *, rate: int, per: float, now: float | None = None) -> float: ...

    async def hold_unique(self, key: str, job_id: str, *, ttl: float) -> str | None: ...

    async def free_unique(self, key: str, job_id: str) -> bool: ...

    async def put_worker(self, worker_id: str, info: str, *, ttl: float) -> None: ...

    async def live_workers(self, *, limit: int = 1000) -> list[str]: ...

    async def forget_worker(self, worker_id: str) -> bool: ...

    async def beat(
        self,
        *,
        lease: float,
        claims: Sequence[tuple[str, str]] = (),
        leases: Sequence[tuple[str, str]] = (),
        watch: Collection[str] = (),
    ) -> Beat: ...


@runtime_checkable
class CancelMarksAt(Protocol):
    """A store whose cancel marks a broker on the same server can read itself (Redis: see
    `aioworkers.brokers.base.ScreensCancelMarks`)."""

    def cancel_marks_at(self) -> tuple[str, str]:
        """(the server, as the broker names it; the marks' key prefix, before the job id)."""
        ...


def check_times(**seconds: float) -> None:
    """Leases and TTLs must be positive: a zero one would free a key at once."""
    for name, value in seconds.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0 seconds, got {value}")


def check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")


def check_rate(rate: int, per: float) -> None:
    if rate < 1:
        raise ValueError(f"rate must be >= 1 token, got {rate}")
    check_times(per=per)


def check_expect(update: JobUpdate, status: str | None) -> bool:
    """Whether ``update`` applies to a record in ``status`` (None: no record)."""
    if status is None or status in FINAL:
        return False
    return update.expect is None or status in update.expect


def as_status(value: str | bytes | None) -> JobStatus | None:
    """A status read back from a backend (checked: a stranger's value is an error)."""
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    for status in STATUSES:
        if status == text:
            return status
    raise ValueError(f"unknown job status {text!r} in the store")


def record_row(r: JobRecord) -> tuple[Any, ...]:
    """A record as the column values the SQL stores keep (`as_record` reads them back)."""
    return (
        r.id,
        r.task,
        r.queue,
        r.status,
        r.attempt,
        r.enqueued_at,
        r.started_at,
        r.finished_at,
        r.error_type,
        r.error,
        r.traceback,
        r.result,
        r.result_error,
    )


def as_record(row: Any) -> JobRecord:
    """The record of a row of `record_row`'s columns."""
    (job_id, task, queue, status, attempt, enqueued, started, finished, *rest) = row
    error_type, error, traceback, result, result_error = rest
    checked = as_status(status)
    assert checked is not None
    return JobRecord(
        job_id,
        task,
        queue,
        checked,
        attempt,
        enqueued,
        started,
        finished,
        error_type,
        error,
        traceback,
        None if result is None else bytes(result),
        result_error,
    )
