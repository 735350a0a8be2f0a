"""Enqueue inside the application's transaction (``conn=``) on ``postgresql://``, with a raw
asyncpg connection and with SQLAlchemy; several workers on one table; how soon a NOTIFY
starts a job. Each test has a database of its own."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import pytest

from aioworkers import App, ConfigError, QueueDepth

from ..services import postgres_database


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with postgres_database() as url:
        assert await App(url).migrate() == [1, 2]
        yield url


@pytest.fixture
async def app(url: str) -> AsyncIterator[App]:
    app = App(f"{url}?poll=0.1", visibility_timeout=5)
    try:
        yield app
    finally:
        await app.aclose()


@pytest.fixture
async def conn(url: str) -> AsyncIterator[asyncpg.Connection]:
    """The application's own connection."""
    c = await asyncpg.connect(url)
    await c.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    try:
        yield c
    finally:
        await c.close()


def _orders_app(app: App) -> list[int]:
    sent: list[int] = []

    @app.task
    async def send_receipt(order: int) -> None:
        sent.append(order)

    return sent


async def _run_burst(app: App) -> dict[str, int]:
    async with asyncio.timeout(20):
        worker = app.worker(concurrency=5, poll=0.1)
        await worker.run(burst=True)
    return worker.counts


async def test_a_job_enqueued_in_a_transaction_exists_exactly_when_it_commits(
    app: App, conn: asyncpg.Connection
) -> None:
    sent = _orders_app(app)
    task = app.tasks["send_receipt"]
    async with conn.transaction():
        await conn.execute("INSERT INTO orders VALUES (1)")
        await task.enqueue(1, conn=conn)  # shorthand: the handler has no `conn` parameter
        await task.options(conn=conn, delay=0).enqueue(2)
        await app.enqueue("send_receipt", [3], conn=conn)
        await app.enqueue_many([task.call(4), task.call(5)], conn=conn)
        # Not visible to anyone else yet, the workers included.
        assert await app.stats() == QueueDepth()
        assert await app.broker.fetch(app.queue, max_messages=10, wait=0) == []
    assert await app.stats() == QueueDepth(ready=5)
    assert await _run_burst(app) == {"ok": 5}
    assert sorted(sent) == [1, 2, 3, 4, 5]


async def test_a_rolled_back_job_never_exists_even_if_a_worker_looked_for_it_meanwhile(
    app: App, conn: asyncpg.Connection
) -> None:
    sent = _orders_app(app)
    task = app.tasks["send_receipt"]
    waiting = asyncio.create_task(app.broker.fetch(app.queue, max_messages=10, wait=1.0))
    tx = conn.transaction()
    await tx.start()
    await conn.execute("INSERT INTO orders VALUES (1)")
    await task.options(conn=conn).enqueue(1)
    # The job would be fetched by now had it been committed: the fetch keeps looking.
    await asyncio.sleep(0.3)
    assert await app.broker.fetch(app.queue, max_messages=10, wait=0) == []
    await tx.rollback()
    assert await waiting == []
    assert await conn.fetchval("SELECT count(*) FROM orders") == 0
    assert await app.stats() == QueueDepth()
    assert await _run_burst(app) == {}
    assert sent == []
    # The connection is fine afterwards, and a committed job runs.
    async with conn.transaction():
        await task.enqueue(2, conn=conn)
    assert await _run_burst(app) == {"ok": 1}
    assert sent == [2]


async def test_a_committed_job_wakes_a_waiting_worker_at_the_commit(
    url: str, conn: asyncpg.Connection
) -> None:
    app = App(f"{url}?poll=30", visibility_timeout=5)  # polling would take 30 s
    try:
        waiting = asyncio.create_task(app.broker.fetch("default", max_messages=1, wait=20))
        await asyncio.sleep(0.3)  # the fetch is waiting (and LISTENing)
        async with conn.transaction():
            await app.enqueue("t", conn=conn)
            await asyncio.sleep(0.3)
            assert not waiting.done()
        async with asyncio.timeout(5):
            (d,) = await waiting
        await app.broker.ack([d])
    finally:
        await app.aclose()


async def test_a_handler_parameter_named_conn_keeps_it(app: App) -> None:
    seen: list[str] = []

    @app.task
    async def connect(conn: str) -> None:
        seen.append(conn)

    await connect.enqueue(conn="db-1")  # the handler's argument, not a transaction
    assert await _run_burst(app) == {"ok": 1}
    assert seen == ["db-1"]


async def test_conn_on_another_broker_is_a_config_error() -> None:
    app = App("memory://")

    @app.task
    async def t() -> None:
        pass

    for enqueue in (
        lambda: t.enqueue(conn=object()),
        lambda: t.options(conn=object()).enqueue(),
        lambda: app.enqueue("t", conn=object()),
        lambda: app.enqueue_many([t.call()], conn=object()),
    ):
        with pytest.raises(ConfigError, match=r"conn=.*postgresql://.*memory://"):
            await enqueue()
    assert await app.stats() == QueueDepth()


async def test_conn_must_be_a_connection_to_the_brokers_database(app: App, url: str) -> None:
    with pytest.raises(ConfigError, match="asyncpg connection"):
        await app.enqueue("t", conn="postgresql://elsewhere")
    async with postgres_database() as other_url:
        other = await asyncpg.connect(other_url)
        try:
            with pytest.raises(ConfigError, match="no worker would see the job"):
                await app.enqueue("t", conn=other)
        finally:
            await other.close()
    # A pool's connection works as well.
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as c, c.transaction():
            await app.enqueue("t", conn=c)
        async with pool.acquire() as c, c.transaction():
            await app.enqueue("t", conn=c)  # the same connection, in a new proxy
    finally:
        await pool.close()
    assert await app.stats() == QueueDepth(ready=2)


# -- SQLAlchemy -------------------------------------------------------------------------------


async def test_sqlalchemy_async_connection_and_session(app: App, url: str) -> None:
    sa = pytest.importorskip("sqlalchemy")
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

    sent = _orders_app(app)
    task = app.tasks["send_receipt"]
    engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with engine.begin() as c:
            await c.execute(sa.text("CREATE TABLE orders (id int PRIMARY KEY)"))

        # The job is the first thing in the transaction: SQLAlchemy has sent no BEGIN yet.
        async with engine.connect() as c:
            await task.enqueue(1, conn=c)
            await c.execute(sa.text("INSERT INTO orders VALUES (1)"))
            await c.rollback()
        async with engine.begin() as c:
            await task.enqueue(2, conn=c)
            await c.execute(sa.text("INSERT INTO orders VALUES (2)"))
        assert await app.stats() == QueueDepth(ready=1)

        sessions = async_sessionmaker(engine, class_=AsyncSession)
        async with sessions() as session:
            await task.options(conn=session).enqueue(3)
            await session.execute(sa.text("INSERT INTO orders VALUES (3)"))
            assert await app.stats() == QueueDepth(ready=1)
            await session.commit()
        async with sessions() as session, session.begin():
            await app.enqueue_many([task.call(4)], conn=session)
            await session.execute(sa.text("INSERT INTO orders VALUES (4)"))

        async def rolled_back() -> None:
            async with sessions() as session, session.begin():
                await task.enqueue(5, conn=session)
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            await rolled_back()
    finally:
        await engine.dispose()
    assert await _run_burst(app) == {"ok": 3}
    assert sorted(sent) == [2, 3, 4]


# -- many workers, one table ------------------------------------------------------------------


async def test_many_workers_on_one_table_never_run_a_job_twice(url: str) -> None:
    runs: Counter[int] = Counter()
    apps = [App(f"{url}?poll=0.1&pool_size=4", visibility_timeout=10) for _ in range(4)]
    for a in apps:

        @a.task(name="count")
        async def count(n: int) -> None:
            runs[n] += 1
            await asyncio.sleep(0)

    jobs = 2000
    for start in range(0, jobs, 500):
        await apps[0].enqueue_many(
            [apps[0].tasks["count"].call(n) for n in range(start, start + 500)]
        )
    workers = [a.worker(concurrency=25, poll=0.1) for a in apps]
    try:
        async with asyncio.timeout(50):
            await asyncio.gather(*(w.run(burst=True) for w in workers))
    finally:
        for a in apps:
            await a.aclose()
    assert sorted(runs) == list(range(jobs))
    assert max(runs.values()) == 1, [n for n, c in runs.items() if c > 1][:10]
    assert sum(w.counts.get("ok", 0) for w in workers) == jobs
    assert sum(1 for w in workers if w.counts.get("ok")) >= 2  # they shared the work


# -- NOTIFY latency ---------------------------------------------------------------------------


async def test_a_committed_job_starts_within_milliseconds_with_a_long_poll(url: str) -> None:
    # A real timer is what is measured: how long from a commit to the job's start. An idle
    # fetch looks again after 2 s (the worker's poll; the broker's own is 30 s): only the
    # notification can explain a start within milliseconds.
    app = App(f"{url}?poll=30", visibility_timeout=5)
    started: asyncio.Queue[float] = asyncio.Queue()

    @app.task
    async def ping() -> None:
        started.put_nowait(time.perf_counter())

    producer = await asyncpg.connect(url)
    worker = app.worker(concurrency=5, poll=2)
    try:
        async with worker:
            await worker.wait_started()
            await asyncio.sleep(0.3)  # the worker is waiting in its long fetch
            latencies = []
            for _ in range(10):
                async with producer.transaction():
                    await ping.enqueue(conn=producer)
                committed = time.perf_counter()
                latencies.append(await asyncio.wait_for(started.get(), 5) - committed)
                await asyncio.sleep(0.05)
    finally:
        await producer.close()
        await app.aclose()
    assert all(latency < 1.0 for latency in latencies), latencies
    assert statistics.median(latencies) < 0.05, latencies
