"""The PostgreSQL state store: tables in a database (by default the ``postgresql://``
broker's own), shared by every worker that reaches it.

Its tables come from the broker's versioned migration 2 (``aioworkers migrate
MODULE:ATTR``, ``app.migrate()``, or `PostgresStore.migrate`); a store on tables that
are behind refuses to start and says what to run. Each operation is one statement, or
one short transaction whose rows (or, for a key's leases and bucket, an advisory lock)
are locked, so it is atomic across processes; what has an owner is changed only WHERE
the owner matches. Times are the server's clock. A waiter wakes on a ``NOTIFY`` sent
when the job ends, and polls now and then besides (a notification is lost while the
listening connection is down).

`complete_in` completes an idempotency key inside the application's own transaction
(``current_job().complete_in(conn)``): the key is done exactly when that transaction
commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection, Iterator, Sequence

import asyncpg

from ..brokers._postgres_conn import ERRORS, Connection, Pool, driver_connection, parse_url
from ..errors import AioworkersError, BrokerUnavailable, ConfigError
from . import _postgres_sql as psql
from ._postgres_jobs import extend_held, finish_jobs, update_jobs
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
    check_limit,
    check_rate,
    check_times,
    record_row,
)

log = logging.getLogger("aioworkers")

# Lapsed rows nobody looks up again are swept this often (seconds), in batches of
# SWEEP_BATCH rows, one statement each, so the sweep never holds many row locks long.
SWEEP_EVERY = 60.0
SWEEP_BATCH = 1000
# A waiter reads the record again after at most this long: at first often (the LISTEN
# connection may not be up yet), backing off to POLL_MAX, or POLL_LISTENING once it is.
POLL_MIN = 0.02
POLL_MAX = 0.25
POLL_LISTENING = 1.0
# Reads after an upsert that wrote nothing, before giving up with "busy" (a row lapsing
# between the two, again and again, is all that makes a second one necessary).
READ_AGAIN = 3


class KeyNotHeld(AioworkersError):
    """`complete_in` found the key no longer held by this run (its claim lapsed and may be
    another run's now): the transaction must not commit as if the key were completed."""


class PostgresStore:
    """``postgresql://user@host/db[?schema=...]``: state in the ``aioworkers_keys``,
    ``aioworkers_records`` and ``aioworkers_state`` tables of ``schema`` (the broker's
    options in the URL are accepted and the pool ones used: a broker's URL opens it)."""

    def __init__(self, url: str) -> None:
        self.settings = parse_url(url)
        self._url = url
        from ..brokers._postgres_sql import Statements

        self._pool = Pool(self.settings, Statements(self.settings.schema))
        self._sql = psql.StoreStatements(self.settings.schema)
        self._waiters = Waiters()
        self._listener: asyncpg.Connection | None = None
        self._listening: asyncio.Task[None] | None = None
        self._sweep_at = 0.0  # the first call sweeps: short-lived processes sweep too
        self._sweeping: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<PostgresStore {self.settings.shown} schema={self.settings.schema}>"

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Connection]:
        """A pooled connection; a transient failure is a `StoreUnavailable`."""
        self._maybe_sweep()
        try:
            async with self._pool.connection() as conn:
                yield conn
        except BrokerUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc

    # -- idempotency claims ---------------------------------------------------------------

    async def claim(self, key: str, owner: str, *, lease: float) -> ClaimResult:
        check_times(lease=lease)
        async with self._conn() as conn:
            for _ in range(READ_AGAIN):
                if await conn.fetchval(self._sql.claim, key, owner, lease):
                    return "claimed"
                row = await conn.fetchrow(self._sql.claim_read, key)
                if row is not None:
                    return "done" if row[0] is None else "busy"
        return "busy"

    async def extend(
        self, claims: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        check_times(lease=lease)
        if not claims:
            return []
        async with self._conn() as conn:
            return await extend_held(conn, self._sql.extend, claims, lease)

    async def complete(self, key: str, owner: str, *, ttl: float) -> bool:
        check_times(ttl=ttl)
        async with self._conn() as conn:
            return bool(await conn.fetchval(self._sql.complete, key, owner, ttl))

    async def release(self, key: str, owner: str) -> bool:
        async with self._conn() as conn:
            return bool(await conn.fetchval(self._sql.release, key, owner))

    async def complete_in(self, conn: object, key: str, owner: str, *, ttl: float) -> None:
        """Complete ``key`` for ``owner`` inside ``conn``'s open transaction (an asyncpg
        connection, or SQLAlchemy's ``AsyncConnection``/``AsyncSession`` on asyncpg): done
        if and when that transaction commits. `KeyNotHeld` if the claim lapsed."""
        check_times(ttl=ttl)
        driver = await driver_connection(conn)
        if not driver.is_in_transaction():
            raise ConfigError(
                "complete_in(conn) needs a connection inside an open transaction (async "
                "with conn.transaction(): ...): outside one the key would be done before "
                "the job's own writes are"
            )
        try:
            with ERRORS:
                done = await driver.fetchval(self._sql.complete_in, key, owner, ttl)
        except BrokerUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        if not done:
            raise KeyNotHeld(
                f"key {key!r} is no longer held by this run (its claim lapsed): roll the "
                "transaction back; the job runs again"
            )

    # -- job records ----------------------------------------------------------------------

    async def put_jobs(self, records: Sequence[JobRecord], *, ttl: float) -> None:
        check_times(ttl=ttl)
        if not records:
            return
        final = [r.id for r in records if r.final]
        async with self._conn() as conn, conn.transaction():
            await conn.executemany(self._sql.put, [(*record_row(r), ttl) for r in records])
            if final:
                await conn.execute(self._sql.notify, final)
        for job_id in final:
            self._waiters.wake(job_id)

    async def put_job(self, record: JobRecord, *, ttl: float) -> None:
        await self.put_jobs([record], ttl=ttl)

    async def get_job(self, job_id: str) -> JobRecord | None:
        async with self._conn() as conn:
            found = await conn.fetchrow(self._sql.get, job_id)
        return None if found is None else as_record(found)

    async def update_jobs(self, updates: Sequence[JobUpdate]) -> list[JobStatus | None]:
        if not updates:
            return []
        async with self._conn() as conn, conn.transaction():
            return await update_jobs(conn, self._sql, updates)

    async def update_job(self, update: JobUpdate) -> JobStatus | None:
        (before,) = await self.update_jobs([update])
        return before

    async def finish_jobs(self, finishes: Sequence[JobFinish]) -> list[JobStatus | None]:
        if not finishes:
            return []
        async with self._conn() as conn, conn.transaction():
            before, ended = await finish_jobs(conn, self._sql, finishes)
        for job_id in ended:
            self._waiters.wake(job_id)
        return before

    async def wait_job(self, job_id: str, *, timeout: float | None) -> JobRecord | None:  # noqa: ASYNC109 (see wait_final)
        self._listen()
        polls = _polls()

        async def wake(seconds: float) -> None:
            step = POLL_LISTENING if self._listening_up() else next(polls)
            await self._waiters.wait(job_id, min(seconds, step))

        async def read() -> JobRecord | None:
            return await self.get_job(job_id)

        return await wait_final(job_id, read, wake, timeout=timeout, step=POLL_LISTENING)

    # -- cancel marks ---------------------------------------------------------------------

    async def mark_cancelled(self, job_id: str, *, ttl: float, known_only: bool = False) -> bool:
        check_times(ttl=ttl)
        sql = self._sql
        async with self._conn() as conn, conn.transaction():
            row = await conn.fetchrow(sql.lock, [job_id])
            status = None if row is None else as_status(row[1])
            if status in FINAL or (known_only and status is None):
                return False
            await conn.execute(sql.state_put, "cancel", job_id, "", None, None, None, ttl)
            ended = status is not None and status != "running"
            if ended:
                await conn.execute(sql.cancel_record, job_id)
                await conn.execute(sql.notify, [job_id])
        if ended:
            self._waiters.wake(job_id)
        return True

    async def cancelled(self, job_ids: Collection[str]) -> set[str]:
        if not job_ids:
            return set()
        async with self._conn() as conn:
            return {row[0] for row in await conn.fetch(self._sql.cancelled, list(job_ids))}

    # -- schedule slots, unique keys ------------------------------------------------------

    # -- the worker registry ---------------------------------------------------------------

    async def put_worker(self, worker_id: str, info: str, *, ttl: float) -> None:
        check_times(ttl=ttl)
        async with self._conn() as conn:
            await conn.execute(self._sql.worker_put, worker_id, info, ttl)

    async def live_workers(self, *, limit: int = 1000) -> list[str]:
        async with self._conn() as conn:
            rows = await conn.fetch(self._sql.workers_live, max(limit, 0))
        return [str(row[0]) for row in rows]

    async def forget_worker(self, worker_id: str) -> bool:
        async with self._conn() as conn:
            return bool(await conn.fetchval(self._sql.worker_forget, worker_id))

    async def claim_slot(self, name: str, slot: str, *, ttl: float) -> bool:
        check_times(ttl=ttl)
        key = f"{len(name)}:{name}:{slot}"
        async with self._conn() as conn:
            args = ("slot", key, "", None, None, None, ttl)
            return bool(await conn.fetchval(self._sql.state_take, *args))

    async def hold_unique(self, key: str, job_id: str, *, ttl: float) -> str | None:
        check_times(ttl=ttl)
        sql = self._sql
        async with self._conn() as conn:
            for _ in range(READ_AGAIN):
                args = ("unique", key, "", job_id, None, None, ttl)
                if await conn.fetchval(sql.state_take, *args):
                    return None
                row = await conn.fetchrow(sql.state_get, "unique", key, "")
                if row is not None:
                    return str(row[0])
        raise StoreUnavailable(f"unique key {key!r} kept changing while it was read")

    async def free_unique(self, key: str, job_id: str) -> bool:
        async with self._conn() as conn:
            return bool(await conn.fetchval(self._sql.unique_free, "unique", key, "", job_id))

    # -- limit leases ---------------------------------------------------------------------

    async def acquire_lease(self, key: str, owner: str, *, limit: int, lease: float) -> bool:
        check_limit(limit)
        check_times(lease=lease)
        sql = self._sql
        async with self._conn() as conn:
            return bool(await conn.fetchval(sql.acquire_lease, key, owner, limit, lease))

    async def extend_leases(
        self, held: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        check_times(lease=lease)
        if not held:
            return []
        async with self._conn() as conn:
            return await extend_held(conn, self._sql.extend_leases, held, lease)

    async def release_lease(self, key: str, owner: str) -> bool:
        async with self._conn() as conn:
            return bool(await conn.fetchval(self._sql.state_delete, "lease", key, owner))

    # -- token buckets --------------------------------------------------------------------

    async def take(self, key: str, *, rate: int, per: float, now: float | None = None) -> float:
        check_rate(rate, per)
        sql = self._sql
        async with self._conn() as conn, conn.transaction():
            await conn.execute(sql.lock_key, f"bucket:{key}")
            clock = float(await conn.fetchval(sql.now))
            at = clock if now is None else now
            row = await conn.fetchrow(sql.state_get, "bucket", key, "")
            tokens, then = (float(rate), at) if row is None else (float(row[1]), float(row[2]))
            tokens = min(float(rate), tokens + max(0.0, at - then) * rate / per)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) * per / rate
            # Idle for ``per`` seconds, a bucket is full again: the same as no row.
            await conn.execute(sql.state_put, "bucket", key, "", None, tokens, at, per)
            return wait

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
        sql = self._sql
        beat = Beat()
        async with self._conn() as conn:
            if claims:
                beat.lost_claims.extend(await extend_held(conn, sql.extend, claims, lease))
            if leases:
                beat.lost_leases.extend(await extend_held(conn, sql.extend_leases, leases, lease))
            if watch:
                beat.cancelled.update(r[0] for r in await conn.fetch(sql.cancelled, list(watch)))
        return beat

    # -- the schema, the sweep, LISTEN ----------------------------------------------------

    async def migrate(self) -> list[int]:
        """Create or upgrade the tables (the broker's migrations, store included), for a
        store whose app's broker is not this database; returns the versions applied."""
        from ..brokers.postgres import PostgresBroker

        broker = PostgresBroker(self._url)  # the same database, schema and options
        try:
            return await broker.migrate()
        finally:
            await broker.aclose()

    def _maybe_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._sweep_at or (self._sweeping and not self._sweeping.done()):
            return
        self._sweep_at = loop.time() + SWEEP_EVERY
        self._sweeping = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Every lapsed row, in bounded batches; a failure waits for the next sweep."""
        try:
            async with self._pool.connection() as conn:
                for statement in self._sql.sweep:
                    while (await conn.execute(statement, SWEEP_BATCH)) == f"DELETE {SWEEP_BATCH}":
                        pass
        except (AioworkersError, OSError) as exc:
            log.debug("postgresql store: sweep failed, next one in %ss: %s", SWEEP_EVERY, exc)

    def _listening_up(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

    def _listen(self) -> None:
        """Start LISTENing for ended jobs in the background if not yet (or no longer)."""
        if self._listening_up() or (self._listening is not None and not self._listening.done()):
            return
        self._listening = asyncio.get_running_loop().create_task(self._connect_listener())

    async def _connect_listener(self) -> None:
        s = self.settings
        try:
            conn = await asyncpg.connect(s.dsn, timeout=s.connect_timeout)
            await conn.add_listener(psql.CHANNEL, self._on_notify)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The waiters poll meanwhile; the next wait tries again.
            log.debug("postgresql store: cannot LISTEN (polling): %s", exc)
            return
        self._listener = conn

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self._waiters.wake(str(payload))

    async def aclose(self) -> None:
        for task in (self._listening, self._sweeping):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        listener, self._listener = self._listener, None
        if listener is not None and not listener.is_closed():
            try:
                await asyncio.wait_for(listener.close(), 2.0)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                listener.terminate()
        await self._pool.aclose()

    async def __aenter__(self) -> PostgresStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _polls() -> Iterator[float]:
    poll = POLL_MIN
    while True:
        yield poll
        poll = min(poll * 2, POLL_MAX)
