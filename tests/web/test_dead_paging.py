"""A DLQ of 100,000 entries walked through the dashboard's dead-letter page, on Redis and
on SQLite: its "older" links lead from the newest entry to the oldest and its "newer"
links back, every entry shown once, and each request reads one page from the broker.

What a request reads is measured where it is read: on Redis, the bytes the client reads
from its sockets (every `asyncio.StreamReader` read in the process: the ASGI client is
in-process, so the broker's connections are the only sockets); on SQLite, the virtual
machine steps of each statement on the file (a progress handler, attributed to the
statement the trace callback names)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from html import unescape
from pathlib import Path
from typing import Any

import orjson
import pytest

from aioworkers import App
from aioworkers.brokers.base import DeadLetter
from aioworkers.envelope import Envelope, encode, now_ms

from ..services import REDIS, REDIS_URL, delete_prefix, ensure
from .conftest import board, client

N = 100_000
SIZE = 500  # the largest page the dashboard offers: 200 pages each way
QUEUE = "default"
SHOWN = re.compile(r'href="/job/(dead-\d+)"')
OLDER = re.compile(r'rel="next" href="\?([^"]*)"')
NEWER = re.compile(r'rel="prev" href="\?([^"]*)"')

pytestmark = pytest.mark.timeout(600)


def entry(i: int) -> tuple[bytes, DeadLetter]:
    env = Envelope(id=f"dead-{i}", task="charge", args=[i], kwargs={}, enqueued_at=now_ms())
    letter = DeadLetter(
        id=env.id,
        task="charge",
        reason="max_retries",
        error="ValueError: card declined",
        attempts=3,
        error_type="ValueError",
        traceback='Traceback (most recent call last):\n  File "shop.py"\nValueError\n',
        dead_at=1_700_000_000.0 + i,
    )
    return encode(env), letter


async def walk(c: Any, size: int) -> tuple[list[list[str]], list[list[str]]]:
    """The pages from the newest by "older" links to the end, then back by "newer"."""
    path = f"/queues/{QUEUE}/dead"
    html = (await c.get(f"{path}?size={size}")).text
    down = [SHOWN.findall(html)]
    while next_page := OLDER.findall(html):
        html = (await c.get(f"{path}?{unescape(next_page[0])}")).text
        down.append(SHOWN.findall(html))
    up = [down[-1]]
    while prev_page := NEWER.findall(html):
        html = (await c.get(f"{path}?{unescape(prev_page[0])}")).text
        up.append(SHOWN.findall(html))
    return down, up


def check_walk(down: list[list[str]], up: list[list[str]]) -> None:
    newest_first = [f"dead-{i}" for i in range(N - 1, -1, -1)]
    assert [i for page in down for i in page] == newest_first  # each once, in order
    assert all(len(page) == SIZE for page in down)
    assert down[-1][-1] == "dead-0"  # the oldest entry is reached
    # Back up by "newer": the pages again, in reverse (the last is the oldest SIZE).
    assert [i for page in reversed(up) for i in page] == newest_first[: N - SIZE] + down[-1]
    assert up[-1][0] == f"dead-{N - 1}"


# -- Redis ----------------------------------------------------------------------------------


@asynccontextmanager
async def redis_app() -> AsyncIterator[App]:
    ensure(REDIS)
    prefix = f"test-paging-{uuid.uuid4().hex[:8]}"
    app = App(f"{REDIS_URL}?prefix={prefix}")
    try:
        yield app
    finally:
        await app.aclose()
        await delete_prefix(prefix)


async def fill_redis(app: App) -> None:
    """XADDs the entries as the broker writes them."""
    broker: Any = app.broker
    dead = broker.keys(QUEUE).dead
    for start in range(0, N, 5000):
        async with broker._redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + 5000, N)):
                body, letter = entry(i)
                pipe.xadd(dead, {"b": body, **letter.facts()})
            await pipe.execute()


@asynccontextmanager
async def socket_bytes(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[int]]:
    """Counts the bytes every `asyncio.StreamReader` read returns, in ``counted[0]``."""
    counted = [0]
    for name in ("read", "readline", "readexactly", "readuntil"):
        real = getattr(asyncio.StreamReader, name)

        def counting(real: Callable[..., Any]) -> Callable[..., Any]:
            async def read(self: asyncio.StreamReader, *args: Any, **kwargs: Any) -> bytes:
                data: bytes = await real(self, *args, **kwargs)
                counted[0] += len(data)
                return data

            return read

        monkeypatch.setattr(asyncio.StreamReader, name, counting(real))
    yield counted


async def test_a_100k_redis_dlq_is_walked_page_by_page(monkeypatch: pytest.MonkeyPatch) -> None:
    async with redis_app() as app:
        await fill_redis(app)
        async with client(board(app)) as c, socket_bytes(monkeypatch) as counted:
            # One entry as Redis sends it (the newest; all are the same size but for
            # their digits).
            broker: Any = app.broker
            await broker._redis.xrevrange(broker.keys(QUEUE).dead, count=1)
            per_entry, counted[0] = counted[0], 0
            sizes: list[int] = []
            real_get = c.get

            async def get(url: str) -> Any:
                before = counted[0]
                reply = await real_get(url)
                assert reply.status_code == 200, reply.text
                sizes.append(counted[0] - before)
                return reply

            c.get = get  # type: ignore[method-assign]
            down, up = await walk(c, SIZE)
        check_walk(down, up)
        # Each request: one page and two more entries, and the queue's counters (a few
        # hundred bytes); the whole DLQ is N * per_entry (~45 MB).
        one_page = (SIZE + 2) * per_entry + 4096
        assert max(sizes) < one_page, (max(sizes), one_page)
        assert max(sizes) > SIZE * per_entry  # the counter does see the page
        assert sum(sizes) < 2.7 * N * per_entry  # the whole DLQ about twice: down and up


# -- SQLite ---------------------------------------------------------------------------------


def fill_sqlite(path: Path) -> None:
    db = sqlite3.connect(path)
    rows = []
    for i in range(N):
        body, letter = entry(i)
        rows.append((QUEUE, body, orjson.dumps(letter.facts())))
    with db:
        db.executemany("INSERT INTO aioworkers_dead (queue, body, facts) VALUES (?, ?, ?)", rows)
    db.close()


class Steps:
    """VM steps of each statement run on the broker's reading connection."""

    EVERY = 100  # steps between two progress callbacks

    def __init__(self) -> None:
        self.current = ""
        self.by_statement: list[tuple[str, int]] = []

    def install(self, db: sqlite3.Connection) -> None:
        db.set_trace_callback(self.trace)
        db.set_progress_handler(self.progress, self.EVERY)

    def trace(self, sql: str) -> None:
        self.by_statement.append((sql, 0))

    def progress(self) -> int:
        if self.by_statement:
            sql, steps = self.by_statement[-1]
            self.by_statement[-1] = (sql, steps + self.EVERY)
        return 0


async def test_a_100k_sqlite_dlq_is_walked_page_by_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aioworkers._sqlite import SqliteFile

    app = App(f"sqlite:///{tmp_path}/jobs.db")
    try:
        await app.stats(QUEUE)  # creates the file and its tables
        fill_sqlite(tmp_path / "jobs.db")
        steps = Steps()
        real_read = SqliteFile._read

        def read(self: SqliteFile, fn: Callable[[sqlite3.Connection], Any]) -> Any:
            def traced(db: sqlite3.Connection) -> Any:
                steps.install(db)
                return fn(db)

            return real_read(self, traced)

        monkeypatch.setattr(SqliteFile, "_read", read)
        per_request: list[list[tuple[str, int]]] = []
        async with client(board(app)) as c:
            real_get = c.get

            async def get(url: str) -> Any:
                steps.by_statement = []
                reply = await real_get(url)
                assert reply.status_code == 200, reply.text
                per_request.append(steps.by_statement)
                return reply

            c.get = get  # type: ignore[method-assign]
            down, up = await walk(c, SIZE)
        check_walk(down, up)
        for statements in per_request:
            pages = [(sql, n) for sql, n in statements if "ORDER BY entry" in sql]
            assert len(pages) == 1, statements  # one page read a request
            sql, n = pages[0]
            assert f"LIMIT {SIZE + 1}" in sql
            # A keyset read: ~8 steps a row of the page (4,000 here), none for the rows
            # before it (a scan from either end to the cursor would cost 3+ steps for
            # each row it skips).
            assert n <= 20 * (SIZE + 2), (sql, n)
            for other, m in statements:
                if other == sql or other in ("BEGIN", "COMMIT"):
                    continue
                # The rest is the counters, and EXISTS probes of one entry. The broker's
                # depth counts the DLQ with COUNT(*) on its (queue, entry) index: ids, no
                # bodies, but ~3 steps an entry (300,000 here), as `aioworkers stats` does.
                assert other.startswith(("SELECT COUNT(*)", "SELECT added", "SELECT EXISTS"))
                if other.startswith("SELECT EXISTS"):
                    assert m <= 100, (other, m)
    finally:
        await app.aclose()
