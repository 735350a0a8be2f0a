"""The PostgreSQL broker: jobs in a table of the application's own database.

A fetch leases up to n ready rows in one ``UPDATE ... FOR UPDATE SKIP LOCKED`` statement
that writes a random lease token and returns the rows; no transaction stays open while a
job runs. Acks, retries, dead letters, extends and releases name the token (fencing), and
each is one statement: acks and extends for a whole batch. Finished rows are deleted.
Statements that only move leases (take, extend, ack, release) commit without waiting for
the WAL flush: a server crash may forget the last of them, and those jobs run again (as
after a worker's crash); enqueues, retries and dead letters are durable commits.
Idle fetches wait for a ``NOTIFY`` sent when a job commits, and poll as a fallback (a
notification sent while the LISTEN connection was down is lost). Publishing through a
connection of the application (`publish_in`) makes the job part of its transaction.

The tables come from explicit, versioned migrations (`migrate`, ``aioworkers migrate``);
the first call checks the schema version and raises a `ConfigError` saying what to run.
See ``_postgres_sql`` for the tables and ``_postgres_conn`` for connections and errors.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import orjson

from ..errors import BrokerUnavailable, ConfigError, LeaseLost
from ._postgres_conn import (
    ERRORS,
    Connection,
    Listener,
    Pool,
    ahead,
    check_connection,
    driver_connection,
    parse_url,
    schema_version,
)
from ._postgres_sql import MAX_PAYLOAD, MIGRATIONS, SCHEMA_VERSION, Statements, migration_lock
from .base import (
    DEFAULT_LEASE,
    DeadLetter,
    DeadLetterPage,
    Delivery,
    QueueDepth,
    entry_number,
    entry_numbers,
)

log = logging.getLogger("aioworkers")

# How often a fetching broker folds the counter deltas into the totals.
FOLD_EVERY = 10.0

_Row = tuple[int, bytes, int]


class PostgresBroker:
    """``postgresql://user:password@host:5432/dbname[?options]`` (or ``postgres://``);
    any libpq option asyncpg knows (``sslmode=verify-full``, ...) passes through.

    Options: ``poll`` (seconds, default 1): the longest an idle fetch waits without a
    notification, so a delayed job, or one notified while the LISTEN connection was down,
    starts at most that late. ``pool_size`` (default 10): connections per process, plus
    one that LISTENs. ``schema`` (default ``public``): where the tables are.
    ``command_timeout`` (default 30 s) and ``connect_timeout`` (default 10 s): a call
    without a reply by then is `BrokerUnavailable`. ``vacuum`` (seconds, default 60, 0:
    never): how often an idle worker that deleted rows vacuums the jobs table, so a
    drained table gives its space back without waiting for autovacuum.
    """

    messaging_system = "postgresql"

    def __init__(self, url: str, *, visibility_timeout: float | None = None) -> None:
        self.settings = parse_url(url)
        self.poll = self.settings.poll
        self.visibility_timeout = visibility_timeout
        self._lease = DEFAULT_LEASE if visibility_timeout is None else visibility_timeout
        self._sql = Statements(self.settings.schema, async_commit=self.settings.async_commit)
        self._pool = Pool(self.settings, self._sql)
        self._listener = Listener(self.settings, self._notify)
        self._wake: dict[str, asyncio.Event] = {}
        # Queues whose last look found their ready rows run out, with no notification since:
        # loop time until which nothing becomes ready there without one (the next delayed
        # row or lease end). An idle fetch waits for the NOTIFY instead of looking again.
        self._dry: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fold_at = 0.0
        self._vacuum_at = 0.0
        self._deleted = 0  # rows this broker deleted since it last vacuumed
        self._background: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<PostgresBroker {self.settings.shown}>"

    # -- wake-ups -------------------------------------------------------------------------------

    def _waiter(self, queue: str) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # an event belongs to the loop that first waits on it
            self._loop, self._wake, self._dry = loop, {}, {}
        event = self._wake.get(queue)
        if event is None:
            event = self._wake[queue] = asyncio.Event()
        return event

    def _notify(self, queue: str) -> None:
        """Wake the fetches waiting on ``queue`` ("": on every queue)."""
        if not queue:
            events = list(self._wake.values())
            self._wake.clear()
            self._dry.clear()
        else:
            self._dry.pop(queue, None)
            event = self._wake.pop(queue, None)
            events = [] if event is None else [event]
        for event in events:
            event.set()

    @staticmethod
    def _payload(queue: str, delay: float) -> str | None:
        """The NOTIFY payload for jobs visible now; None (no notification) for delayed ones,
        which idle fetches find by their visible time."""
        if delay > 0:
            return None
        return queue if len(queue.encode()) <= MAX_PAYLOAD else ""

    # -- the Broker protocol ----------------------------------------------------------------

    async def publish(self, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0) -> None:
        if not bodies:
            return
        delay = max(float(delay), 0.0)
        async with self._pool.connection() as conn:
            await self._insert(conn, queue, bodies, delay)
        # This process's fetches look again (a delayed job: when it is due); others are
        # told by NOTIFY, or find a delayed job by polling.
        self._notify(queue)

    async def publish_in(
        self, conn: object, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0
    ) -> None:
        """Publish through ``conn``, a connection of the application (asyncpg, or SQLAlchemy's
        ``AsyncConnection`` / ``AsyncSession`` on asyncpg): inside its open transaction, the
        jobs become visible when it commits and never exist if it rolls back (outside one,
        they are committed at once). The workers are notified at the commit."""
        if not bodies:
            return
        raw = await driver_connection(conn)
        await check_connection(raw, self._sql, self._pool)
        with ERRORS:
            await self._insert(raw, queue, bodies, max(float(delay), 0.0))

    async def _insert(
        self, conn: Connection, queue: str, bodies: Sequence[bytes], delay: float
    ) -> None:
        payloads = [bytes(body) for body in bodies]
        await conn.execute(self._sql.publish, queue, payloads, delay, self._payload(queue, delay))

    async def fetch(
        self, queue: str, *, max_messages: int, wait: float, lease: float | None = None
    ) -> list[Delivery]:
        lease = self._lease if lease is None else lease
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            # Before the look: a notification that comes during it is not missed.
            wake = self._waiter(queue)
            if wait > 0:
                self._listener.ensure()
                dry = self._dry.get(queue, 0.0) - loop.time() if self._listener.up else 0.0
                if dry > 0:
                    # The last look (a fetch that took what was ready) found nothing more,
                    # and no job was notified since: wait for one before looking again.
                    # (Up to `poll`, as after an empty look.)
                    del self._dry[queue]
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        return []
                    await self._sleep_until(wake, min(remaining, self.poll, dry))
                    continue
            got, next_in = await self._take(queue, max_messages, lease, look_ahead=wait > 0)
            if wait > 0 and len(got) < max_messages and not wake.is_set():
                # Taken up to the last ready row, none notified meanwhile: the next fetch
                # waits for a notification (or the next row due) instead of looking.
                self._dry[queue] = loop.time() + (next_in if next_in is not None else math.inf)
            await self._housekeeping(idle=not got)
            remaining = deadline - loop.time()
            if got or remaining <= 0:
                return got
            # The next row of the queue due (delayed, or a lease running out) is looked
            # for again when it is; a new job is announced by NOTIFY; polling covers a
            # notification lost while the listener reconnects.
            self._dry.pop(queue, None)
            timeout = min(remaining, self.poll, next_in if next_in is not None else remaining)
            await self._sleep_until(wake, timeout)

    @staticmethod
    async def _sleep_until(wake: asyncio.Event, seconds: float) -> None:
        """Until ``wake`` is set, for at most ``seconds``."""
        try:
            async with asyncio.timeout(max(seconds, 0.0)):
                await wake.wait()
        except TimeoutError:
            pass

    async def _take(
        self, queue: str, max_messages: int, lease: float, *, look_ahead: bool
    ) -> tuple[list[Delivery], float | None]:
        if max_messages <= 0:
            return [], None
        token = secrets.randbits(62)
        task = asyncio.ensure_future(self._take_rows(queue, max_messages, token, lease, look_ahead))
        try:
            rows, next_in = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The rows are leased by the statement whatever happens here: hand them back.
            task.add_done_callback(lambda done: self._hand_back(done, queue, token))
            raise
        return [Delivery(queue, str(i), body, count, token) for i, body, count in rows], next_in

    async def _take_rows(
        self, queue: str, n: int, token: int, lease: float, look_ahead: bool
    ) -> tuple[list[_Row], float | None]:
        async with self._pool.connection() as conn:
            rows = await conn.fetch(self._sql.take, queue, n, token, float(lease), look_ahead)
        taken, next_in = [], None
        for r in rows:
            if r[0] is None:  # the look ahead's row: the ready rows ran out
                next_in = r[3]
            else:
                taken.append((r[0], r[1], r[2]))
        taken.sort()
        return taken, next_in

    def _hand_back(
        self, done: asyncio.Future[tuple[list[_Row], float | None]], queue: str, token: int
    ) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        rows, _ = done.result()
        if rows:
            deliveries = [Delivery(queue, str(i), b"", count, token) for i, _, count in rows]
            self._spawn(self.release(deliveries), "hand back the rows of a cancelled fetch")

    def _spawn(self, coro: Any, what: str) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)

        def finished(task: asyncio.Task[Any]) -> None:
            self._background.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.warning("postgresql: could not %s: %s", what, task.exception())

        task.add_done_callback(finished)

    async def stop_fetching(self, queue: str) -> None:
        """Nothing to hand back: rows are only taken by `fetch`."""

    async def ack(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        if not deliveries:
            return []
        ids, tokens = _keys(deliveries)
        async with self._pool.connection() as conn:
            gone = {r[0] for r in await conn.fetch(self._sql.ack, ids, tokens)}
            self._deleted += len(gone)
            if len(gone) == len(set(ids)):
                return []
            # Rare: an ack repeated after a lost reply (gone already), or a lost lease (the
            # row is there under another token).
            left = [i for i in ids if i not in gone]
            lost = {r[0] for r in await conn.fetch(self._sql.still_there, left)}
        return [d for d in deliveries if int(d.message_id) in lost]

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> None:
        delay = max(float(delay), 0.0)
        async with self._pool.connection() as conn:
            row = await conn.fetchrow(
                self._sql.retry, int(delivery.message_id), delivery.token, bytes(body), delay
            )
        if row is None:
            raise LeaseLost(f"{delivery!r} is no longer leased by this worker")
        self._deleted += 1
        self._notify(delivery.queue)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        ids, tokens = _keys(deliveries)
        async with self._pool.connection() as conn:
            rows = await conn.fetch(self._sql.release, ids, tokens)
        for row in rows:
            self._notify(row[0])

    async def extend(
        self, deliveries: Sequence[Delivery], *, lease: float | None = None
    ) -> list[Delivery]:
        if not deliveries:
            return []
        lease = self._lease if lease is None else lease
        ids, tokens = _keys(deliveries)
        async with self._pool.connection() as conn:
            rows = await conn.fetch(self._sql.extend, ids, tokens, float(lease))
        held = {(r[0], r[1]) for r in rows}
        return [d for d in deliveries if (int(d.message_id), d.token) not in held]

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        facts = orjson.dumps(letter.facts()).decode()
        async with self._pool.connection() as conn:
            entry = await conn.fetchval(
                self._sql.dead_letter, int(delivery.message_id), delivery.token, facts
            )
        if entry is None:
            raise LeaseLost(f"{delivery!r} is no longer leased by this worker")
        self._deleted += 1

    async def depth(self, queue: str) -> QueueDepth:
        async with self._pool.connection() as conn:
            row = await conn.fetchrow(self._sql.depth, queue)
        assert row is not None
        ready, later, leased, dead = row
        return QueueDepth(ready, leased, later - leased, dead)

    async def aclose(self) -> None:
        """Close the connections; a later call opens them again."""
        for task in list(self._background):
            await asyncio.gather(task, return_exceptions=True)
        await self._listener.aclose()
        await self._pool.aclose()
        self._notify("")

    # -- capabilities ---------------------------------------------------------------------------

    async def totals(self, queue: str) -> dict[str, int]:
        """``added``: jobs ever written to the queue (enqueued, and retries); ``left``: those
        that left it (acked, retried or dead-lettered); ``dead``: dead letters ever written."""
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(self._sql.fold)
            row = await conn.fetchrow(self._sql.totals, queue)
        added, left, dead = row if row is not None else (0, 0, 0)
        return {"added": int(added), "left": int(left), "dead": int(dead)}

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        async with self._pool.connection() as conn:
            rows = await conn.fetch(self._sql.dead_letters, queue, max(limit, 0))
        return _letters(queue, rows)

    async def dead_letter_page(
        self, queue: str, *, before: str | None = None, after: str | None = None, limit: int = 50
    ) -> DeadLetterPage:
        """`DeadLetterPages`: keyset on the (queue, entry) index, ``limit + 1`` rows read
        from the cursor, and an EXISTS probe the other way, in one snapshot."""
        limit = max(limit, 1)
        sql = self._sql
        newest_first = after is None
        if newest_first:
            cursor = _NO_ENTRY if before is None else entry_number(before)
            read, probe = sql.dead_page_older, None if before is None else sql.dead_newer_exists
        else:
            cursor = entry_number(after) if after else 0
            read, probe = sql.dead_page_newer, sql.dead_older_exists if after else None
        async with self._pool.connection() as conn, conn.transaction(isolation="repeatable_read"):
            rows = await conn.fetch(read, queue, cursor, limit + 1)
            beyond = bool(probe is not None and await conn.fetchval(probe, queue, cursor))
        return DeadLetterPage.of(
            _letters(queue, rows), limit=limit, newest_first=newest_first, beyond=beyond
        )

    async def dead_letters_by_id(self, queue: str, entry_ids: Collection[str]) -> list[DeadLetter]:
        wanted = entry_numbers(entry_ids)
        if not wanted:
            return []
        async with self._pool.connection() as conn:
            return _letters(queue, await conn.fetch(self._sql.dead_by_id, queue, wanted))

    async def remove_dead_letters(self, queue: str, entry_ids: Collection[str] | None) -> int:
        async with self._pool.connection() as conn:
            if entry_ids is None:
                status = await conn.execute(self._sql.purge_dead, queue)
            else:
                wanted = entry_numbers(entry_ids)
                status = await conn.execute(self._sql.remove_dead, queue, wanted)
        return int(status.rsplit(" ", 1)[-1])

    async def send_dead_letter(self, queue: str, body: bytes, letter: DeadLetter) -> None:
        facts = orjson.dumps(letter.facts()).decode()
        async with self._pool.connection() as conn:
            await conn.execute(self._sql.send_dead_letter, queue, bytes(body), facts)

    async def schema_version(self) -> int:
        """The version of the tables in the database (0: none), without checking it."""
        conn = await self._pool.raw()
        try:
            with ERRORS:
                return await schema_version(conn, self._sql)
        finally:
            await conn.close()

    async def migrate(self) -> list[int]:
        """Create or upgrade the tables: apply the migrations not applied yet, in order, in
        one transaction (concurrent migrations wait for each other); returns the versions
        applied (``[]``: up to date). Needs the right to create tables in the schema."""
        conn = await self._pool.raw()
        try:
            with ERRORS:
                async with conn.transaction():
                    return await self._apply(conn)
        finally:
            await conn.close()
            await self._pool.aclose()  # checked again on next use

    async def _apply(self, conn: Connection) -> list[int]:
        sql = self._sql
        await conn.execute("SELECT pg_advisory_xact_lock($1)", migration_lock())
        if sql.schema != "public":
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {sql.schema}")
        await conn.execute(sql.create_version_table())
        current = int(await conn.fetchval(sql.version))
        if current > SCHEMA_VERSION:
            raise ahead(current, self._pool.where())
        applied = []
        for m in MIGRATIONS:
            if m.version > current:
                await conn.execute(sql.migration(m))
                await conn.execute(sql.record_migration(), m.version, m.what)
                applied.append(m.version)
                log.info("postgresql: applied migration %d (%s)", m.version, m.what)
        return applied

    # -- housekeeping -------------------------------------------------------------------------

    async def _housekeeping(self, *, idle: bool) -> None:
        now = time.monotonic()
        if now >= self._fold_at:
            self._fold_at = now + FOLD_EVERY
            await self._quietly(self._sql.fold, "fold the counters")
        vacuum = self.settings.vacuum
        if idle and vacuum and self._deleted and now >= self._vacuum_at:
            self._vacuum_at, self._deleted = now + vacuum, 0
            # Gives a drained table's pages back to the disk now; SKIP_LOCKED: never waits
            # for another worker's vacuum. Without the table's ownership, PostgreSQL skips
            # it with a notice (autovacuum still runs).
            await self._quietly(self._sql.vacuum, "vacuum the jobs table")

    async def _quietly(self, statement: str, what: str) -> None:
        try:
            async with self._pool.connection() as conn:
                await conn.execute(statement)
        except (BrokerUnavailable, ConfigError) as exc:
            log.warning("postgresql: could not %s (trying again later): %s", what, exc)


def _keys(deliveries: Sequence[Delivery]) -> tuple[list[int], list[int]]:
    return [int(d.message_id) for d in deliveries], [int(d.token) for d in deliveries]


_NO_ENTRY = 2**63 - 1  # above every entry id: the newest page


def _letters(queue: str, rows: Sequence[Any]) -> list[DeadLetter]:
    return [
        DeadLetter.from_facts(
            _getter(orjson.loads(facts)), queue=queue, entry_id=str(entry), body=bytes(body)
        )
        for entry, body, facts in rows
    ]


def _getter(facts: dict[str, Any]) -> Callable[[str], str | None]:
    def get(name: str) -> str | None:
        value = facts.get(name)
        return None if value is None else str(value)

    return get
