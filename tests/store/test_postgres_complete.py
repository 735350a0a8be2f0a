"""``current_job().complete_in(conn)`` on ``postgresql://``: an idempotent job's key is
completed in the job's own transaction, so its writes there happen once: a run that
fails (or is SIGKILLed) after the commit is not run again, and a transaction that rolled
back leaves the key free and the job is tried again. Each test has a database of its own."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from aioworkers import App, current_job
from aioworkers.store.postgres import PostgresStore

from ..services import postgres_database


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with postgres_database("aw_complete") as url:
        assert await App(url).migrate() == [1, 2]
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CREATE TABLE charges (n int NOT NULL)")
        finally:
            await conn.close()
        yield url


async def _charges(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return [r[0] for r in await conn.fetch("SELECT n FROM charges ORDER BY n")]
    finally:
        await conn.close()


async def _burst(app: App) -> dict[str, int]:
    async with asyncio.timeout(20):
        worker = app.worker(concurrency=2, poll=0.1)
        await worker.run(burst=True)
    return worker.counts


class Rollback(Exception):
    pass


def _charge_app(url: str, fail: str) -> tuple[App, list[int]]:
    """A task that writes a charge and completes its key in one transaction; its first
    attempt then fails as ``fail`` says: "after" the commit, "inside" it (rollback), or
    "swallowed" (rolled back, and the handler returns as if all went well)."""
    app = App(url, visibility_timeout=5)
    attempts: list[int] = []

    @app.task(idempotent=True, retries=3, backoff=0.01)
    async def charge(n: int) -> None:
        job = current_job()
        attempts.append(job.attempt)
        first = job.attempt == 1
        conn = await asyncpg.connect(url)
        try:
            try:
                async with conn.transaction():
                    await conn.execute("INSERT INTO charges VALUES ($1)", n)
                    await job.complete_in(conn)
                    if first and fail in ("inside", "swallowed"):
                        raise Rollback
            except Rollback:
                if fail == "inside":
                    raise
        finally:
            await conn.close()
        if first and fail == "after":
            raise RuntimeError("failed after the commit")

    return app, attempts


async def _key_state(url: str, key: str) -> str:
    store = PostgresStore(url)
    try:
        state = await store.claim(key, "probe", lease=5)
        if state == "claimed":
            await store.release(key, "probe")
        return state
    finally:
        await store.aclose()


async def test_a_job_failing_after_its_commit_is_not_run_again(url: str) -> None:
    app, attempts = _charge_app(url, "after")
    try:
        await app.enqueue("charge", [7], key="order-7")
        counts = await _burst(app)
    finally:
        await app.aclose()
    # The retry found the key done with the charge: acked without running.
    assert attempts == [1]
    assert await _charges(url) == [7]
    assert counts.get("duplicate") == 1
    assert await _key_state(url, "charge:order-7") == "done"


async def test_a_rolled_back_transaction_leaves_the_key_free_and_the_job_runs_again(
    url: str,
) -> None:
    app, attempts = _charge_app(url, "inside")
    try:
        await app.enqueue("charge", [8], key="order-8")
        await _burst(app)
    finally:
        await app.aclose()
    assert attempts == [1, 2]
    assert await _charges(url) == [8]  # the first attempt's row was rolled back
    assert await _key_state(url, "charge:order-8") == "done"


async def test_a_handler_returning_after_a_rollback_is_tried_again(url: str) -> None:
    app, attempts = _charge_app(url, "swallowed")
    try:
        await app.enqueue("charge", [9], key="order-9")
        counts = await _burst(app)
    finally:
        await app.aclose()
    # Returned, but its key was not committed: the worker saw it and retried the job.
    assert attempts == [1, 2]
    assert counts.get("retried") == 1
    assert await _charges(url) == [9]
    assert await _key_state(url, "charge:order-9") == "done"


async def test_complete_in_outside_a_transaction_or_an_idempotent_task_is_refused(
    url: str,
) -> None:
    from aioworkers import AioworkersError, ConfigError

    app = App(url, visibility_timeout=5)
    errors: list[str] = []

    @app.task(idempotent=True, retries=0)
    async def bare() -> None:
        conn = await asyncpg.connect(url)
        try:
            await current_job().complete_in(conn)  # no transaction open
        except ConfigError as exc:
            errors.append(str(exc))
        finally:
            await conn.close()

    @app.task(retries=0)
    async def plain() -> None:
        try:
            await current_job().complete_in(object())
        except AioworkersError as exc:
            errors.append(str(exc))

    try:
        await app.enqueue("bare", [])
        await app.enqueue("plain", [])
        await _burst(app)
    finally:
        await app.aclose()
    assert len(errors) == 2
    assert any("open transaction" in e for e in errors)
    assert any("idempotent task" in e for e in errors)


_KILLED_APP = """
    import asyncio, os, signal, sys
    import asyncpg
    from aioworkers import App, current_job

    url = sys.argv[1]
    app = App(url, visibility_timeout=1)

    @app.task(idempotent=True)
    async def charge(n: int) -> None:
        conn = await asyncpg.connect(url)
        async with conn.transaction():
            await conn.execute("INSERT INTO charges VALUES ($1)", n)
            await current_job().complete_in(conn)
        os.kill(os.getpid(), signal.SIGKILL)  # after the commit, before the ack

    asyncio.run(app.worker(poll=0.1).run())
"""


async def test_a_worker_killed_after_the_commit_does_not_charge_twice(
    url: str, tmp_path: Path
) -> None:
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(_KILLED_APP))
    app, attempts = _charge_app(url, "none")
    try:
        await app.enqueue("charge", [5], key="order-5")
        proc = await asyncio.create_subprocess_exec(sys.executable, str(script), url)
        assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
        assert await _charges(url) == [5]
        # The dead worker's lease on the message is a real timer (1 s) in the database.
        await asyncio.sleep(1.2)
        counts = await _burst(app)
    finally:
        await app.aclose()
    assert attempts == []  # the redelivery found the key done: never ran here
    assert counts.get("duplicate") == 1
    assert await _charges(url) == [5]


def test_the_store_defaults_to_a_postgres_brokers_database() -> None:
    from aioworkers.store import default_url_for

    url = "postgresql://u@db.example/app?schema=jobs&poll=0.5"
    assert default_url_for(url) == url
    assert isinstance(App(url).store, PostgresStore)
    # A broker instance too: its database and schema.
    from aioworkers.brokers.postgres import PostgresBroker

    store = App(PostgresBroker(url)).store
    assert isinstance(store, PostgresStore)
    assert store.settings.schema == "jobs"
    assert store.settings.dsn == "postgresql://u@db.example/app"


async def test_complete_in_takes_a_sqlalchemy_session(url: str) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://"))
    sessions = async_sessionmaker(engine)
    app = App(url, visibility_timeout=5)
    attempts: list[int] = []

    @app.task(idempotent=True, retries=3, backoff=0.01)
    async def charge(n: int) -> None:
        attempts.append(current_job().attempt)
        async with sessions() as session, session.begin():
            await session.execute(sqlalchemy.text("INSERT INTO charges VALUES (:n)"), {"n": n})
            await current_job().complete_in(session)
        if len(attempts) == 1:
            raise RuntimeError("failed after the commit")

    try:
        await app.enqueue("charge", [3], key="order-3")
        await _burst(app)
    finally:
        await app.aclose()
        await engine.dispose()
    assert attempts == [1]
    assert await _charges(url) == [3]
