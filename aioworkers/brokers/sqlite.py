"""The SQLite broker: a durable queue in one file, no server. Several worker and producer
processes on one machine share it; jobs survive restarts and a killed worker's jobs come
back after their lease, as on a networked broker.

One table holds every message; its state follows from two columns:

- ``visible_at <= now``: ready (a lapsed lease included: its worker died);
- ``visible_at > now`` and ``lease`` set: in flight, leased until ``visible_at``;
- ``visible_at > now`` and no ``lease``: delayed until ``visible_at``.

A fetch takes rows in one ``UPDATE ... RETURNING`` that writes a new random lease token
and ``visible_at = now + lease`` (the lease the fetch is given; an extend sets it to now
plus its own), and every settle names the token it was handed, so a worker whose lease
lapsed never acts over the next holder. Calls run on one thread per broker that owns
the connection, so the event loop never waits on the file. Times are wall-clock seconds:
every process on the machine shares them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from .._sqlite import SqliteFile, parse_url, seconds_option, transaction
from ..errors import BrokerUnavailable, ConfigError, LeaseLost
from .base import (
    DEFAULT_LEASE,
    DeadLetter,
    DeadLetterPage,
    Delivery,
    QueueDepth,
    entry_number,
    entry_numbers,
    handed_back,
)

log = logging.getLogger("aioworkers")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS aioworkers_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    visible_at REAL NOT NULL,
    count INTEGER NOT NULL DEFAULT 0,
    lease TEXT
);
CREATE INDEX IF NOT EXISTS aioworkers_messages_visible
    ON aioworkers_messages (queue, visible_at, id);
CREATE INDEX IF NOT EXISTS aioworkers_messages_leased
    ON aioworkers_messages (queue, visible_at) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS aioworkers_dead (
    entry INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    facts BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS aioworkers_dead_queue ON aioworkers_dead (queue, entry);
CREATE TABLE IF NOT EXISTS aioworkers_totals (
    queue TEXT PRIMARY KEY,
    added INTEGER NOT NULL DEFAULT 0,
    removed INTEGER NOT NULL DEFAULT 0,
    dead INTEGER NOT NULL DEFAULT 0
);
"""

_ANY_READY = "SELECT 1 FROM aioworkers_messages WHERE queue = ? AND visible_at <= ? LIMIT 1"
_TAKE = """
UPDATE aioworkers_messages SET lease = ?, count = count + 1, visible_at = ?
WHERE id IN (
    SELECT id FROM aioworkers_messages WHERE queue = ? AND visible_at <= ?
    ORDER BY visible_at, id LIMIT ?
)
RETURNING id, body, count
"""
_DELETE_OWNED = "DELETE FROM aioworkers_messages WHERE id = ? AND lease = ?"
# The rows of one lease token, in one statement each ({} is the ids' placeholders).
_DELETE_LEASED = "DELETE FROM aioworkers_messages WHERE lease = ? AND id IN ({})"
_EXTEND_LEASED = "UPDATE aioworkers_messages SET visible_at = ? WHERE lease = ? AND id IN ({})"
_CHUNK = 500  # ids per statement: well inside SQLite's limit on parameters
# Which of these ids are still there / still leased by this token.
_PRESENT = "SELECT id FROM aioworkers_messages WHERE id IN ({})"
_HELD = "SELECT id FROM aioworkers_messages WHERE lease = ? AND id IN ({})"
_INSERT = "INSERT INTO aioworkers_messages (queue, body, visible_at) VALUES (?, ?, ?)"
_RELEASE = (
    "UPDATE aioworkers_messages SET lease = NULL, visible_at = 0, count = ? "
    "WHERE id = ? AND lease = ?"
)
# Each a range count on an index: ready, not yet visible (delayed or leased), leased.
_COUNT_READY = "SELECT COUNT(*) FROM aioworkers_messages WHERE queue = ? AND visible_at <= ?"
_COUNT_LATER = "SELECT COUNT(*) FROM aioworkers_messages WHERE queue = ? AND visible_at > ?"
_COUNT_LEASED = (
    "SELECT COUNT(*) FROM aioworkers_messages "
    "WHERE queue = ? AND visible_at > ? AND lease IS NOT NULL"
)
_COUNT_DEAD = "SELECT COUNT(*) FROM aioworkers_dead WHERE queue = ?"
_TOTALS = """
INSERT INTO aioworkers_totals (queue, added, removed, dead) VALUES (?, ?, ?, ?)
ON CONFLICT (queue) DO UPDATE SET
    added = added + excluded.added,
    removed = removed + excluded.removed,
    dead = dead + excluded.dead
"""

# How often an idle broker gives the pages that drained jobs freed back to the disk.
VACUUM_EVERY = 60.0


class SqliteBroker:
    """``sqlite:///path/to/jobs.db[?poll=0.05&timeout=5]`` (a relative path is taken from
    the working directory when the broker is created).

    ``poll``: how often an idle fetch looks for work another process added (seconds;
    work added in this process wakes it at once). ``timeout``: how long a call waits for
    another process's write lock before the call fails as `BrokerUnavailable` (and the
    runtime backs off and retries). The file and its tables are created on first use.
    Times are the machine's wall clock: a clock stepped back by an hour hides a dead
    worker's jobs that much longer.
    """

    messaging_system = "sqlite"

    def __init__(self, url: str, *, visibility_timeout: float | None = None) -> None:
        path, query = parse_url(url, "the broker URL")
        self.poll = seconds_option(query, "poll", 0.05, low=0.001)
        busy_timeout = seconds_option(query, "timeout", 5.0, low=0.001)
        if query:
            raise ConfigError(
                f"sqlite:// has no option {sorted(query)[0]!r} (known: poll, timeout)"
            )
        self.path = Path(path)
        self.visibility_timeout = visibility_timeout
        self._lease = DEFAULT_LEASE if visibility_timeout is None else visibility_timeout
        self._file = SqliteFile(
            path, schema=_SCHEMA, busy_timeout=busy_timeout, unavailable=BrokerUnavailable
        )
        self._call = self._file.call
        self._wake: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._vacuum_at = 0.0
        self._busy: set[str] = set()  # queues whose last take found rows (writer thread)

    def __repr__(self) -> str:
        return f"<SqliteBroker {self.path}>"

    def _waiter(self, queue: str) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # an event belongs to the loop that first waits on it
            self._loop, self._wake = loop, {}
        event = self._wake.get(queue)
        if event is None:
            event = self._wake[queue] = asyncio.Event()
        return event

    def _notify(self, queue: str) -> None:
        event = self._wake.pop(queue, None)
        if event is not None:
            event.set()

    # -- the Broker protocol ------------------------------------------------------------------

    async def publish(self, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0) -> None:
        if not bodies:
            return
        payloads = [bytes(body) for body in bodies]

        def insert(db: sqlite3.Connection) -> None:
            with transaction(db) as now:
                visible_at = now + max(delay, 0.0)
                db.executemany(_INSERT, [(queue, body, visible_at) for body in payloads])
                db.execute(_TOTALS, (queue, len(payloads), 0, 0))

        await self._call(insert)
        self._notify(queue)

    async def fetch(
        self, queue: str, *, max_messages: int, wait: float, lease: float | None = None
    ) -> list[Delivery]:
        lease = self._lease if lease is None else lease
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            wake = self._waiter(queue)
            got = await self._take(queue, max_messages, lease)
            remaining = deadline - loop.time()
            if got or remaining <= 0:
                return got
            try:
                # Woken at once by this process's publishes; others' are seen by polling.
                async with asyncio.timeout(min(remaining, self.poll)):
                    await wake.wait()
            except TimeoutError:
                pass

    async def _take(self, queue: str, max_messages: int, lease: float) -> list[Delivery]:
        if max_messages <= 0:
            return []
        token = os.urandom(8).hex()

        def take(db: sqlite3.Connection) -> list[tuple[int, bytes, int]]:
            # Read first (no lock in WAL mode): idle workers polling an empty queue must
            # not queue up for the write lock. Not while the queue is busy (the last take
            # here found rows): then the read is a statement more per batch for nothing.
            if (
                queue in self._busy
                or db.execute(_ANY_READY, (queue, time.time())).fetchone() is not None
            ):
                with transaction(db) as now:
                    # The lease starts once the lock is held: a wait for it must not
                    # shorten the lease (or hand out one that is already over).
                    args = (token, now + lease, queue, now, max_messages)
                    rows = db.execute(_TAKE, args).fetchall()
                if rows:
                    self._busy.add(queue)
                    rows.sort()
                    return rows
                self._busy.discard(queue)
            if time.monotonic() > self._vacuum_at:
                self._vacuum_at = time.monotonic() + VACUUM_EVERY
                self._file.vacuum(db)
            return []

        future = self._file.submit(take)
        try:
            rows = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The rows are leased in the thread whatever happens here: hand them back.
            future.add_done_callback(partial(self._hand_back, token))
            raise
        return [Delivery(queue, str(i), body, count, token) for i, body, count in rows]

    def _hand_back(self, token: str, future: asyncio.Future[list[tuple[int, bytes, int]]]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        rows = [(i, token, count - 1) for i, _, count in future.result()]
        if rows:
            # If this fails too, the rows come back when their lease lapses.
            released = self._file.clean_up(partial(_release, rows))
            released.add_done_callback(_log_failed_hand_back)

    async def stop_fetching(self, queue: str) -> None:
        """Nothing to hand back: rows are only taken by `fetch`."""

    async def ack(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        if not deliveries:
            return []
        groups = _by_lease(deliveries)

        def delete(db: sqlite3.Connection) -> set[tuple[int, Any]]:
            with transaction(db):
                removed: Counter[str] = Counter()
                short: list[tuple[int, Any]] = []
                for (queue, token), ids in groups.items():
                    for chunk in _chunks(ids):
                        statement = _DELETE_LEASED.format(_marks(chunk))
                        n = db.execute(statement, (token, *chunk)).rowcount
                        removed[queue] += n
                        if n < len(chunk):
                            short.extend((row_id, token) for row_id in chunk)
                for queue, n in removed.items():
                    if n:
                        db.execute(_TOTALS, (queue, 0, n, 0))
                # Not ours: lost if the row is still there (leased again, or waiting). Only
                # asked when a statement deleted fewer rows than it named.
                return _still_there(db, short)

        lost = await self._call(delete)
        return [d for d in deliveries if (int(d.message_id), d.token) in lost] if lost else []

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> None:
        payload = bytes(body)

        def replace(db: sqlite3.Connection) -> bool:
            with transaction(db) as now:
                if not db.execute(
                    _DELETE_OWNED, (int(delivery.message_id), delivery.token)
                ).rowcount:
                    return False
                db.execute(_INSERT, (delivery.queue, payload, now + max(delay, 0.0)))
                db.execute(_TOTALS, (delivery.queue, 1, 1, 0))
                return True

        if not await self._call(replace):
            raise LeaseLost(f"{delivery!r} is no longer leased by this worker")
        self._notify(delivery.queue)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        rows = [(int(d.message_id), d.token, handed_back(d)) for d in deliveries]
        await self._call(partial(_release, rows))
        for queue in {d.queue for d in deliveries}:
            self._notify(queue)

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
        if not deliveries:
            return []
        groups = _by_lease(deliveries)

        def extend(db: sqlite3.Connection) -> set[tuple[int, Any]]:
            lost: set[tuple[int, Any]] = set()
            with transaction(db) as now:
                for (_, token), ids in groups.items():
                    for chunk in _chunks(ids):
                        statement = _EXTEND_LEASED.format(_marks(chunk))
                        n = db.execute(statement, (now + lease, token, *chunk)).rowcount
                        if n < len(chunk):
                            held = _ids(db, _HELD.format(_marks(chunk)), (token, *chunk))
                            lost.update((i, token) for i in chunk if i not in held)
            return lost

        lost = await self._call(extend)
        return [d for d in deliveries if (int(d.message_id), d.token) in lost] if lost else []

    async def send_dead_letter(self, queue: str, body: bytes, letter: DeadLetter) -> None:
        """`DeadLetterWriter`: a body that was never a delivery here (a push request)."""
        facts = orjson.dumps(letter.facts())

        def write(db: sqlite3.Connection) -> None:
            with transaction(db):
                db.execute(
                    "INSERT INTO aioworkers_dead (queue, body, facts) VALUES (?, ?, ?)",
                    (queue, bytes(body), facts),
                )
                db.execute(_TOTALS, (queue, 0, 0, 1))

        await self._call(write)

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        facts = orjson.dumps(letter.facts())

        def move(db: sqlite3.Connection) -> bool:
            # One transaction: the letter is stored exactly when the original goes.
            with transaction(db):
                if not db.execute(
                    _DELETE_OWNED, (int(delivery.message_id), delivery.token)
                ).rowcount:
                    return False
                db.execute(
                    "INSERT INTO aioworkers_dead (queue, body, facts) VALUES (?, ?, ?)",
                    (delivery.queue, delivery.body, facts),
                )
                db.execute(_TOTALS, (delivery.queue, 0, 1, 1))
                return True

        if not await self._call(move):
            raise LeaseLost(f"{delivery!r} is no longer leased by this worker")

    async def depth(self, queue: str) -> QueueDepth:
        def count(db: sqlite3.Connection) -> QueueDepth:
            now = time.time()
            ((ready,),) = db.execute(_COUNT_READY, (queue, now))
            ((later,),) = db.execute(_COUNT_LATER, (queue, now))
            ((leased,),) = db.execute(_COUNT_LEASED, (queue, now))
            ((dead,),) = db.execute(_COUNT_DEAD, (queue,))
            return QueueDepth(ready, leased, later - leased, dead)

        return await self._file.read(count)

    async def totals(self, queue: str) -> dict[str, int]:
        """Counters for rates (``aioworkers stats --watch``), not part of the Broker
        protocol: ``added``, jobs ever written to the queue (enqueued, and retries);
        ``left``, those that left it (acked, retried or dead-lettered); ``dead``, dead
        letters ever written. Kept in the file, with the jobs."""

        def read(db: sqlite3.Connection) -> dict[str, int]:
            row = db.execute(
                "SELECT added, removed, dead FROM aioworkers_totals WHERE queue = ?", (queue,)
            ).fetchone()
            added, left, dead = row or (0, 0, 0)
            return {"added": added, "left": left, "dead": dead}

        return await self._file.read(read)

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        def read(db: sqlite3.Connection) -> list[tuple[int, bytes, bytes]]:
            return db.execute(
                "SELECT entry, body, facts FROM aioworkers_dead WHERE queue = ? "
                "ORDER BY entry LIMIT ?",
                (queue, max(limit, 0)),
            ).fetchall()

        return _letters(queue, await self._file.read(read))

    async def dead_letter_page(
        self, queue: str, *, before: str | None = None, after: str | None = None, limit: int = 50
    ) -> DeadLetterPage:
        """`DeadLetterPages`: keyset on the (queue, entry) index, ``limit + 1`` rows read
        from the cursor, and an EXISTS probe of one index entry the other way."""
        limit = max(limit, 1)
        newest_first = after is None
        if newest_first:
            cursor = _NO_ENTRY if before is None else entry_number(before)
            sql, probe = _PAGE_OLDER, None if before is None else _NEWER_EXISTS
        else:
            cursor = entry_number(after) if after else 0
            sql, probe = _PAGE_NEWER, _OLDER_EXISTS if after else None

        def read(db: sqlite3.Connection) -> tuple[list[tuple[int, bytes, bytes]], bool]:
            rows = db.execute(sql, (queue, cursor, limit + 1)).fetchall()
            beyond = probe is not None and db.execute(probe, (queue, cursor)).fetchone()[0]
            return rows, bool(beyond)

        rows, beyond = await self._file.read(read)
        return DeadLetterPage.of(
            _letters(queue, rows), limit=limit, newest_first=newest_first, beyond=beyond
        )

    async def dead_letters_by_id(self, queue: str, entry_ids: Collection[str]) -> list[DeadLetter]:
        wanted = sorted(set(entry_numbers(entry_ids)))

        def read(db: sqlite3.Connection) -> list[tuple[int, bytes, bytes]]:
            return [row for n in wanted for row in db.execute(_BY_ID, (queue, n)).fetchall()]

        return _letters(queue, await self._file.read(read)) if wanted else []

    async def remove_dead_letters(self, queue: str, entry_ids: Collection[str] | None) -> int:
        wanted = None
        if entry_ids is not None:
            wanted = [(queue, int(e)) for e in entry_ids if e.isascii() and e.isdigit()]

        def remove(db: sqlite3.Connection) -> int:
            with transaction(db):
                if wanted is None:
                    cur = db.execute("DELETE FROM aioworkers_dead WHERE queue = ?", (queue,))
                    return int(cur.rowcount)
                return sum(
                    db.execute(
                        "DELETE FROM aioworkers_dead WHERE queue = ? AND entry = ?", pair
                    ).rowcount
                    for pair in wanted
                )

        return await self._call(remove)

    async def aclose(self) -> None:
        """Close the file once the calls already made are done; a later call opens it
        again."""
        await self._file.aclose()


_COLUMNS = "SELECT entry, body, facts FROM aioworkers_dead WHERE queue = ?"
_PAGE_OLDER = f"{_COLUMNS} AND entry < ? ORDER BY entry DESC LIMIT ?"
_PAGE_NEWER = f"{_COLUMNS} AND entry > ? ORDER BY entry LIMIT ?"
_NEWER_EXISTS = "SELECT EXISTS (SELECT 1 FROM aioworkers_dead WHERE queue = ? AND entry >= ?)"
_OLDER_EXISTS = "SELECT EXISTS (SELECT 1 FROM aioworkers_dead WHERE queue = ? AND entry <= ?)"
_BY_ID = f"{_COLUMNS} AND entry = ?"
_NO_ENTRY = 2**63 - 1  # above every entry id: the newest page


def _letters(queue: str, rows: list[tuple[int, bytes, bytes]]) -> list[DeadLetter]:
    return [
        DeadLetter.from_facts(
            _getter(orjson.loads(raw)), queue=queue, entry_id=str(entry), body=bytes(body)
        )
        for entry, body, raw in rows
    ]


def _getter(facts: dict[str, Any]) -> Callable[[str], str | None]:
    def get(name: str) -> str | None:
        value = facts.get(name)
        return None if value is None else str(value)

    return get


def _by_lease(deliveries: Sequence[Delivery]) -> dict[tuple[str, Any], list[int]]:
    """Row ids by (queue, lease token): a fetch's deliveries share one, so an ack or an
    extend of a batch is one statement, not one per row."""
    groups: dict[tuple[str, Any], list[int]] = {}
    for d in deliveries:
        key = (d.queue, d.token)
        ids = groups.get(key)
        if ids is None:
            groups[key] = [int(d.message_id)]
        else:
            ids.append(int(d.message_id))
    return groups


def _chunks(ids: list[int]) -> list[list[int]]:
    if len(ids) <= _CHUNK:
        return [ids]
    return [ids[start : start + _CHUNK] for start in range(0, len(ids), _CHUNK)]


def _marks(chunk: list[int]) -> str:
    return ", ".join("?" * len(chunk))


def _ids(db: sqlite3.Connection, statement: str, args: Sequence[object]) -> set[int]:
    return {row_id for (row_id,) in db.execute(statement, args)}


def _still_there(db: sqlite3.Connection, pairs: list[tuple[int, Any]]) -> set[tuple[int, Any]]:
    """Those of ``pairs`` (row id, token) whose row still exists."""
    there: set[int] = set()
    for chunk in _chunks(sorted({row_id for row_id, _ in pairs})):
        there |= _ids(db, _PRESENT.format(_marks(chunk)), chunk)
    return {pair for pair in pairs if pair[0] in there}


def _release(rows: list[tuple[int, str, int]], db: sqlite3.Connection) -> None:
    """Make leased rows ``(id, token, count)`` ready again at once, first in line, with the
    count before this delivery (`handed_back`: a hand-back at shutdown must never push a
    job toward max_deliveries)."""
    with transaction(db):
        db.executemany(_RELEASE, [(count, mid, token) for mid, token, count in rows])


def _log_failed_hand_back(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning(
            "could not hand back the rows of a cancelled fetch; they come back when their "
            "lease lapses: %s",
            future.exception(),
        )
