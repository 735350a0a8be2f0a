"""The raw side on SQLite: a plain sqlite3 loop doing the same work as aioworkers.

The connection lives on a single-thread executor, so the event loop never waits on the
file. While slots are free, one ``UPDATE ... RETURNING`` leases up to 100 ready rows of
the queue (a random token, visible again after 30 s: a killed worker's jobs come back,
as in aioworkers); an empty fetch sleeps 50 ms (aioworkers' default ``?poll=``: another
process's inserts are only seen by polling). One asyncio task per row (decode the
envelope, call the handler it names); finished rows deleted by id and token, one
transaction per batch, while the next rows run. No retries, delivery counts, dead letters
or lease extension. Imports no part of aioworkers.

    python benchmarks/_raw_sqlite.py '<spec json>'    (started by run.py --broker sqlite)
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson
from _child import Spec, Work, main

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
ACK_BATCH = 1000


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=5.0, isolation_level=None)  # autocommit
    db.execute("PRAGMA synchronous=NORMAL")
    return db


class RawSqlite:
    def __init__(self, spec: Spec, work: Work) -> None:
        self.path = spec.raw_url
        self.queue = spec.queue
        self.capacity = spec.concurrency
        self.handlers: dict[str, Callable[..., Coroutine[Any, Any, None]]] = work.handlers
        self.thread = ThreadPoolExecutor(1)  # owns the connection
        self.db: sqlite3.Connection | None = None
        self.running = 0
        self.jobs: set[asyncio.Task[None]] = set()
        self.acks: list[tuple[int, str]] = []
        self.ack_wake = asyncio.Event()
        self.room = asyncio.Event()
        self.stopping = False
        self.fetcher: asyncio.Task[None] | None = None
        self.acker: asyncio.Task[None] | None = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    async def start(self) -> asyncio.Task[None]:
        self.db = await self._call(connect, self.path)
        self.acker = asyncio.create_task(self._ack_loop())
        self.fetcher = asyncio.create_task(self._fetch_loop())
        return self.fetcher

    def _take(self, n: int) -> tuple[str, list[tuple[int, bytes]]]:
        assert self.db is not None
        token, now = os.urandom(8).hex(), time.time()
        args = (token, now + LEASE_SECONDS, self.queue, now, n)
        return token, self.db.execute(TAKE, args).fetchall()

    def _delete(self, batch: list[tuple[int, str]]) -> None:
        assert self.db is not None
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany(DELETE, batch)
        self.db.execute("COMMIT")

    async def _fetch_loop(self) -> None:
        while not self.stopping:
            free = self.capacity - self.running
            if free <= 0:
                self.room.clear()
                await self.room.wait()
                continue
            token, rows = await self._call(self._take, min(FETCH_MAX, free))
            if not rows:
                await asyncio.sleep(POLL_SECONDS)
            for row_id, body in rows:
                self.running += 1
                job = asyncio.create_task(self._run(row_id, token, body))
                self.jobs.add(job)  # the loop keeps only weak references to tasks
                job.add_done_callback(self.jobs.discard)

    async def _run(self, row_id: int, token: str, body: bytes) -> None:
        try:
            env = orjson.loads(body)
            await self.handlers[env["task"]](*env["args"], **env["kwargs"])
        finally:
            self.acks.append((row_id, token))
            self.ack_wake.set()
            self.running -= 1
            self.room.set()

    async def _ack_loop(self) -> None:
        while True:
            await self.ack_wake.wait()
            self.ack_wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        # One thread runs the calls in order: a flush started later commits later.
        while self.acks:
            batch = self.acks[:ACK_BATCH]
            del self.acks[:ACK_BATCH]
            await self._call(self._delete, batch)

    async def stop(self) -> None:
        self.stopping = True
        self.room.set()
        if self.fetcher is not None and not self.fetcher.done():
            await self.fetcher
        await asyncio.gather(*self.jobs)
        if self.acker is not None:
            self.acker.cancel()
        await self._flush()
        if self.db is not None:
            await self._call(self.db.close)
        self.thread.shutdown()


if __name__ == "__main__":
    main(RawSqlite)
