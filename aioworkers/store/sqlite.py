"""The SQLite state store: tables in a database file, shared by the processes of one
machine (by default the ``sqlite://`` broker's own file).

Each write is one ``BEGIN IMMEDIATE`` transaction on the file's writing thread, so it is
atomic across processes; reads (a record, cancel marks) run on the reading thread. Times
are the machine's wall clock. A waiter in the process that finishes a job wakes at once;
one in another process polls, every `POLL_MIN` seconds at first, backing off to `POLL_MAX`.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TypeVar

from .._sqlite import SqliteFile, parse_url, seconds_option, transaction
from ..errors import ConfigError
from . import _sqlite_sql as sql
from ._wait import Waiters, wait_final
from .base import (
    FINAL,
    Beat,
    ClaimResult,
    JobFinish,
    JobRecord,
    JobStatus,
    JobUpdate,
    StoreUnavailable,
    as_record,
    as_status,
    check_expect,
    check_limit,
    check_rate,
    check_times,
    record_row,
)

T = TypeVar("T")

# Lapsed rows nobody looks up again are swept this often (seconds), in bounded batches so
# that the sweep never holds the file's write lock long.
SWEEP_EVERY = 60.0
SWEEP_BATCH = 1000
POLL_MIN = 0.01
POLL_MAX = 0.1
CHUNK = 500  # ids per IN (...): far below SQLite's limit on parameters


class SqliteStore:
    """``sqlite:///path/to/jobs.db[?timeout=5]``: state in the ``aioworkers_idempotency``,
    ``aioworkers_jobs`` and ``aioworkers_state`` tables. ``timeout``: how long a call waits
    for another process's write lock before it fails as `StoreUnavailable` (the runtime
    then defers the job)."""

    def __init__(self, url: str) -> None:
        path, query = parse_url(url, "the store URL")
        busy_timeout = seconds_option(query, "timeout", 5.0, low=0.001)
        query.pop("poll", None)  # the broker's option, when the store shares its URL
        if query:
            raise ConfigError(
                f"sqlite:// store has no option {sorted(query)[0]!r} (known: timeout)"
            )
        self.path = path
        self._file = SqliteFile(
            path, schema=sql.SCHEMA, busy_timeout=busy_timeout, unavailable=StoreUnavailable
        )
        self._sweep_at = 0.0  # the first write sweeps: short-lived processes sweep too
        self._waiters = Waiters()

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path}>"

    async def _write(self, fn: Callable[[sqlite3.Connection, float], T]) -> T:
        """Run ``fn(db, now)`` in one write transaction (after a sweep, when one is due)."""
        sweep = time.monotonic() > self._sweep_at
        if sweep:
            self._sweep_at = time.monotonic() + SWEEP_EVERY

        def write(db: sqlite3.Connection) -> T:
            if sweep:
                _sweep(db)
            with transaction(db) as now:
                return fn(db, now)

        return await self._file.call(write)

    async def _read(self, fn: Callable[[sqlite3.Connection, float], T]) -> T:
        return await self._file.read(lambda db: fn(db, time.time()))

    # -- idempotency claims ---------------------------------------------------------------

    async def claim(self, key: str, owner: str, *, lease: float) -> ClaimResult:
        check_times(lease=lease)

        def claim(db: sqlite3.Connection, now: float) -> ClaimResult:
            row = db.execute(sql.CLAIM_READ, (key, now)).fetchone()
            if row is not None:
                return "done" if row[0] is None else "busy"
            db.execute(sql.CLAIM_WRITE, (key, owner, now + lease))
            return "claimed"

        return await self._write(claim)

    async def extend(
        self, claims: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        check_times(lease=lease)
        if not claims:
            return []
        return await self._write(functools.partial(_extend_claims, claims, lease))

    async def complete(self, key: str, owner: str, *, ttl: float) -> bool:
        check_times(ttl=ttl)

        def complete(db: sqlite3.Connection, now: float) -> bool:
            return bool(db.execute(sql.CLAIM_COMPLETE, (now + ttl, key, owner, now)).rowcount)

        return await self._write(complete)

    async def release(self, key: str, owner: str) -> bool:
        def release(db: sqlite3.Connection, now: float) -> bool:
            return bool(db.execute(sql.CLAIM_RELEASE, (key, owner, now)).rowcount)

        return await self._write(release)

    # -- job records ----------------------------------------------------------------------

    async def put_jobs(self, records: Sequence[JobRecord], *, ttl: float) -> None:
        check_times(ttl=ttl)
        if not records:
            return

        def put(db: sqlite3.Connection, now: float) -> None:
            db.executemany(sql.JOB_PUT, [(*record_row(r), now + ttl) for r in records])

        await self._write(put)
        for record in records:
            if record.final:
                self._waiters.wake(record.id)

    async def put_job(self, record: JobRecord, *, ttl: float) -> None:
        await self.put_jobs([record], ttl=ttl)

    async def get_job(self, job_id: str) -> JobRecord | None:
        def get(db: sqlite3.Connection, now: float) -> JobRecord | None:
            row = db.execute(sql.JOB_GET, (job_id, now)).fetchone()
            return None if row is None else as_record(row)

        return await self._read(get)

    async def update_jobs(self, updates: Sequence[JobUpdate]) -> list[JobStatus | None]:
        if not updates:
            return []

        def update(db: sqlite3.Connection, now: float) -> list[JobStatus | None]:
            before = []
            for change in updates:
                status = _status(db, change.id, now)
                before.append(status)
                if check_expect(change, status):
                    given = {n: getattr(change, n) for n in sql.UPDATABLE}
                    sets = {n: v for n, v in given.items() if v is not None}
                    sets["expires"] = now + change.ttl
                    assignments = ", ".join(f"{name} = ?" for name in sets)
                    db.execute(
                        f"UPDATE aioworkers_jobs SET {assignments} WHERE id = ?",
                        (*sets.values(), change.id),
                    )
            return before

        return await self._write(update)

    async def update_job(self, update: JobUpdate) -> JobStatus | None:
        (before,) = await self.update_jobs([update])
        return before

    async def finish_jobs(self, finishes: Sequence[JobFinish]) -> list[JobStatus | None]:
        if not finishes:
            return []
        before = await self._write(functools.partial(_finish, finishes))
        for finish, status in zip(finishes, before, strict=True):
            if status not in FINAL:
                self._waiters.wake(finish.id)
        return before

    async def wait_job(self, job_id: str, *, timeout: float | None) -> JobRecord | None:  # noqa: ASYNC109 (see wait_final)
        polls = _polls()

        async def wake(seconds: float) -> None:
            await self._waiters.wait(job_id, min(seconds, next(polls)))

        read = functools.partial(self.get_job, job_id)
        return await wait_final(job_id, read, wake, timeout=timeout, step=POLL_MAX)

    # -- cancel marks ---------------------------------------------------------------------

    async def mark_cancelled(self, job_id: str, *, ttl: float, known_only: bool = False) -> bool:
        check_times(ttl=ttl)

        def mark(db: sqlite3.Connection, now: float) -> tuple[bool, bool]:
            status = _status(db, job_id, now)
            if status in FINAL or (known_only and status is None):
                return False, False
            db.execute(sql.STATE_PUT, ("cancel", job_id, "", None, None, None, now + ttl))
            ended = status is not None and status != "running"
            if ended:
                db.execute(sql.JOB_CANCEL, (now, job_id))
            return True, ended

        marked, ended = await self._write(mark)
        if ended:
            self._waiters.wake(job_id)
        return marked

    async def cancelled(self, job_ids: Collection[str]) -> set[str]:
        if not job_ids:
            return set()
        return await self._read(functools.partial(_cancelled, list(job_ids)))

    # -- the worker registry --------------------------------------------------------------

    async def put_worker(self, worker_id: str, info: str, *, ttl: float) -> None:
        check_times(ttl=ttl)
        await self._write(
            lambda db, now: db.execute(sql.WORKER_PUT, (worker_id, info, now, now + ttl))
        )

    async def live_workers(self, *, limit: int = 1000) -> list[str]:
        def read(db: sqlite3.Connection, now: float) -> list[str]:
            return [row[0] for row in db.execute(sql.WORKERS_LIVE, (now, max(limit, 0)))]

        return await self._read(read)

    async def forget_worker(self, worker_id: str) -> bool:
        def forget(db: sqlite3.Connection, now: float) -> bool:
            return db.execute(sql.WORKER_FORGET, (worker_id, now)).rowcount > 0

        return await self._write(forget)

    # -- schedule slots, unique keys ------------------------------------------------------

    async def claim_slot(self, name: str, slot: str, *, ttl: float) -> bool:
        check_times(ttl=ttl)
        key = f"{len(name)}:{name}:{slot}"

        def claim(db: sqlite3.Connection, now: float) -> bool:
            if db.execute(sql.STATE_GET, ("slot", key, "", now)).fetchone() is not None:
                return False
            db.execute(sql.STATE_PUT, ("slot", key, "", None, None, None, now + ttl))
            return True

        return await self._write(claim)

    async def hold_unique(self, key: str, job_id: str, *, ttl: float) -> str | None:
        check_times(ttl=ttl)

        def hold(db: sqlite3.Connection, now: float) -> str | None:
            row = db.execute(sql.STATE_GET, ("unique", key, "", now)).fetchone()
            if row is not None and row[0] != job_id:
                return str(row[0])
            db.execute(sql.STATE_PUT, ("unique", key, "", job_id, None, None, now + ttl))
            return None

        return await self._write(hold)

    async def free_unique(self, key: str, job_id: str) -> bool:
        def free(db: sqlite3.Connection, now: float) -> bool:
            return bool(db.execute(sql.UNIQUE_FREE, ("unique", key, "", now, job_id)).rowcount)

        return await self._write(free)

    # -- limit leases ---------------------------------------------------------------------

    async def acquire_lease(self, key: str, owner: str, *, limit: int, lease: float) -> bool:
        check_limit(limit)
        check_times(lease=lease)

        def acquire(db: sqlite3.Connection, now: float) -> bool:
            db.execute(sql.LEASES_DROP_LAPSED, (key, now))
            holders = {row[0] for row in db.execute(sql.LEASES_HELD, (key,))}
            if owner not in holders and len(holders) >= limit:
                return False
            db.execute(sql.STATE_PUT, ("lease", key, owner, None, None, None, now + lease))
            return True

        return await self._write(acquire)

    async def extend_leases(
        self, held: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        check_times(lease=lease)
        if not held:
            return []
        return await self._write(functools.partial(_extend_leases, held, lease))

    async def release_lease(self, key: str, owner: str) -> bool:
        def release(db: sqlite3.Connection, now: float) -> bool:
            return bool(db.execute(sql.STATE_DELETE, ("lease", key, owner, now)).rowcount)

        return await self._write(release)

    # -- token buckets --------------------------------------------------------------------

    async def take(self, key: str, *, rate: int, per: float, now: float | None = None) -> float:
        check_rate(rate, per)

        def take(db: sqlite3.Connection, clock: float) -> float:
            at = clock if now is None else now
            row = db.execute(sql.BUCKET_GET, ("bucket", key, "", clock)).fetchone()
            tokens, then = (float(rate), at) if row is None else (float(row[0]), float(row[1]))
            tokens = min(float(rate), tokens + max(0.0, at - then) * rate / per)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) * per / rate
            # Idle for ``per`` seconds, a bucket is full again: the same as no row.
            db.execute(sql.STATE_PUT, ("bucket", key, "", None, tokens, at, clock + per))
            return wait

        return await self._write(take)

    # -- the heartbeat --------------------------------------------------------------------

    async def beat(
        self,
        *,
        lease: float,
        claims: Sequence[tuple[str, str]] = (),
        leases: Sequence[tuple[str, str]] = (),
        watch: Collection[str] = (),
    ) -> Beat:
        check_times(lease=lease)
        ids = list(watch)

        def beat(db: sqlite3.Connection, now: float) -> Beat:
            return Beat(
                _extend_claims(claims, lease, db, now),
                _extend_leases(leases, lease, db, now),
                _cancelled(ids, db, now),
            )

        return await self._write(beat)

    async def aclose(self) -> None:
        await self._file.aclose()

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _sweep(db: sqlite3.Connection) -> None:
    """Every lapsed row, a batch per transaction so that others write in between."""
    for statement in sql.SWEEP.values():
        more = True
        while more:
            with transaction(db) as now:
                more = db.execute(statement, (now, SWEEP_BATCH)).rowcount == SWEEP_BATCH


def _polls() -> Iterator[float]:
    poll = POLL_MIN
    while True:
        yield poll
        poll = min(poll * 2, POLL_MAX)


def _status(db: sqlite3.Connection, job_id: str, now: float) -> JobStatus | None:
    row = db.execute(sql.JOB_STATUS, (job_id, now)).fetchone()
    return None if row is None else as_status(row[0])


def _finish(
    finishes: Sequence[JobFinish], db: sqlite3.Connection, now: float
) -> list[JobStatus | None]:
    before = []
    for f in finishes:
        status = _status(db, f.id, now)
        before.append(status)
        if status in FINAL:
            continue
        outcome = (f.error_type, f.error, f.traceback, f.result, f.result_error)
        if status is None:
            record = JobRecord(f.id, f.task, f.queue, f.status, attempt=f.attempt or 1)
            db.execute(sql.JOB_PUT, (*record_row(record), now + f.ttl))
        db.execute(sql.JOB_END, (f.status, f.finished_at, f.attempt, *outcome, now + f.ttl, f.id))
    return before


def _extend_claims(
    claims: Sequence[tuple[str, str]], lease: float, db: sqlite3.Connection, now: float
) -> list[tuple[str, str]]:
    return [
        (key, owner)
        for key, owner in claims
        if db.execute(sql.CLAIM_EXTEND, (now + lease, key, owner, now)).rowcount == 0
    ]


def _extend_leases(
    held: Sequence[tuple[str, str]], lease: float, db: sqlite3.Connection, now: float
) -> list[tuple[str, str]]:
    return [
        (key, owner)
        for key, owner in held
        if db.execute(sql.STATE_EXTEND, (now + lease, "lease", key, owner, now)).rowcount == 0
    ]


def _cancelled(ids: list[str], db: sqlite3.Connection, now: float) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        statement = sql.CANCELLED.format(", ".join("?" * len(chunk)))
        found.update(row[0] for row in db.execute(statement, (now, *chunk)))
    return found
