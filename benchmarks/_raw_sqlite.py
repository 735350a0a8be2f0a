"""The raw side on SQLite: a plain sqlite3 loop doing the same work as aioworkers.

The connection lives on a single-thread executor, so the event loop never waits on the
file. While slots are free, one ``UPDATE ... RETURNING`` leases up to 100 ready rows of
the queue (a random token, visible again after 30 s: a killed worker's jobs come back,
as in aioworkers); an empty fetch sleeps 50 ms (aioworkers' default ``?poll=``: another
process's inserts are only seen by polling). One asyncio task per row (decode the
envelope, call the handler it names); finished rows deleted by id and token, one
transaction per batch, while the next rows run (the loop is `_rawloop.py`'s). No retries,
delivery counts, dead letters or lease extension. Imports no part of aioworkers.

    python benchmarks/_raw_sqlite.py '<spec json>'    (started by run.py --broker sqlite)
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from _child import Spec, Work, main
from _rawloop import RawLoop

T = TypeVar("T")

# The parent creates the table (WAL mode) and inserts the rows the raw side reads, on a
# connection made by `connect` too.
SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    visible_at REAL NOT NULL,
    lease TEXT
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (queue, visible_at, id);
"""
INSERT = "INSERT INTO jobs (queue, body, visible_at) VALUES (?, ?, ?)"
TAKE = """
UPDATE jobs SET lease = ?, visible_at = ?
WHERE id IN (
    SELECT id FROM jobs WHERE queue = ? AND visible_at <= ? ORDER BY visible_at, id LIMIT ?
)
RETURNING id, body
"""
DELETE = "DELETE FROM jobs WHERE id = ? AND lease = ?"
FETCH_MAX = 100
LEASE_SECONDS = 30.0
POLL_SECONDS = 0.05


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=5.0, isolation_level=None)  # autocommit
    db.execute("PRAGMA synchronous=NORMAL")
    return db


class RawSqlite(RawLoop[tuple[int, str]]):
    def __init__(self, spec: Spec, work: Work) -> None:
        super().__init__(spec, work, ack_batch=1000)
        self.path = spec.raw_url
        self.queue = spec.queue
        self.thread = ThreadPoolExecutor(1)  # owns the connection
        self.db: sqlite3.Connection | None = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    async def start(self) -> asyncio.Task[None]:
        self.db = await self._call(connect, self.path)
        return await super().start()

    def _take(self, n: int) -> list[tuple[tuple[int, str], bytes]]:
        assert self.db is not None
        token, now = os.urandom(8).hex(), time.time()
        args = (token, now + LEASE_SECONDS, self.queue, now, n)
        return [((row_id, token), body) for row_id, body in self.db.execute(TAKE, args)]

    def _delete(self, batch: list[tuple[int, str]]) -> None:
        assert self.db is not None
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany(DELETE, batch)
        self.db.execute("COMMIT")

    async def _fetch(self, free: int) -> list[tuple[tuple[int, str], bytes]]:
        rows = await self._call(self._take, min(FETCH_MAX, free))
        if not rows:
            await asyncio.sleep(POLL_SECONDS)
        return rows

    async def _settle(self, batch: list[tuple[int, str]]) -> None:
        # One thread runs the calls in order: a flush started later commits later.
        await self._call(self._delete, batch)

    async def stop(self) -> None:
        await super().stop()
        if self.db is not None:
            await self._call(self.db.close)
        self.thread.shutdown()


if __name__ == "__main__":
    main(RawSqlite)
