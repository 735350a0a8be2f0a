"""Job records on PostgreSQL: the batched changes that read a record's status before they
write, each run inside the caller's transaction with the records' rows locked first (in
one order, so two batches never deadlock on each other)."""

from __future__ import annotations

from collections.abc import Sequence

from ..brokers._postgres_conn import Connection
from ._postgres_sql import StoreStatements
from .base import (
    FINAL,
    JobFinish,
    JobRecord,
    JobStatus,
    JobUpdate,
    as_status,
    check_expect,
)


async def _lock(conn: Connection, sql: StoreStatements, ids: list[str]) -> dict[str, JobStatus]:
    """The status of each live record of ``ids``, its row locked until the transaction ends."""
    found: dict[str, JobStatus] = {}
    for job_id, status in await conn.fetch(sql.lock, ids):
        checked = as_status(status)
        assert checked is not None
        found[job_id] = checked
    return found


async def update_jobs(
    conn: Connection, sql: StoreStatements, updates: Sequence[JobUpdate]
) -> list[JobStatus | None]:
    status = await _lock(conn, sql, sorted({u.id for u in updates}))
    before: list[JobStatus | None] = []
    rows = []
    for u in updates:
        now = status.get(u.id)
        before.append(now)
        if check_expect(u, now):
            fields = (u.status, u.attempt, u.started_at, u.error_type, u.error, u.traceback)
            rows.append((u.id, *fields, u.ttl))
            if u.status is not None:
                status[u.id] = u.status  # what a later update of the batch sees
    if rows:
        await conn.executemany(sql.update, rows)
    return before


async def finish_jobs(
    conn: Connection, sql: StoreStatements, finishes: Sequence[JobFinish]
) -> tuple[list[JobStatus | None], list[str]]:
    """The status of each record before its finish, and the ids it ended (to notify)."""
    status: dict[str, JobStatus | None] = dict(
        await _lock(conn, sql, sorted({f.id for f in finishes}))
    )
    before: list[JobStatus | None] = []
    ended: list[str] = []
    for f in finishes:
        now = status.get(f.id)
        if now is None and not await _create(conn, sql, f):
            # Another transaction created it first (and committed): its row, locked now.
            now = (await _lock(conn, sql, [f.id])).get(f.id)
        before.append(now)
        if now in FINAL:
            continue
        outcome = (f.error_type, f.error, f.traceback, f.result, f.result_error)
        await conn.execute(sql.end, f.id, f.status, f.finished_at, f.attempt, *outcome, f.ttl)
        status[f.id] = f.status
        ended.append(f.id)
    if ended:
        await conn.execute(sql.notify, ended)
    return before, ended


async def _create(conn: Connection, sql: StoreStatements, f: JobFinish) -> bool:
    """Create the missing record of ``f`` (over a lapsed row); False if a live one exists."""
    record = JobRecord(f.id, f.task, f.queue, f.status, attempt=f.attempt or 1)
    args = (
        record.id,
        record.task,
        record.queue,
        record.status,
        record.attempt,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        f.ttl,
    )
    return bool(await conn.fetchval(sql.create, *args))


async def extend_held(
    conn: Connection, statement: str, held: Sequence[tuple[str, str]], lease: float
) -> list[tuple[str, str]]:
    """Extend each ``(key, owner)``; returns those not held any more."""
    keys, owners = [k for k, _ in held], [o for _, o in held]
    kept = {(r[0], r[1]) for r in await conn.fetch(statement, keys, owners, lease)}
    return [pair for pair in held if pair not in kept]
