"""The PostgreSQL broker beyond the conformance suite: migrations and the schema check,
the error table, reconnecting, a cancelled fetch, counters, and the table's size after a
run. Each test has a database of its own, dropped afterwards."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from aioworkers import App, BrokerUnavailable, ConfigError, QueueDepth
from aioworkers.brokers import open_broker
from aioworkers.brokers._postgres_conn import ERRORS, parse_url
from aioworkers.brokers._postgres_sql import SCHEMA_VERSION, Statements
from aioworkers.brokers.postgres import PostgresBroker

from ..proxy import Proxy
from ..services import postgres_database


@pytest.fixture
async def fresh_url() -> AsyncIterator[str]:
    """An empty database: never migrated."""
    async with postgres_database() as url:
        yield url


@pytest.fixture
async def url(fresh_url: str) -> str:
    """A database with the aioworkers tables."""
    assert await App(fresh_url).migrate() == list(range(1, SCHEMA_VERSION + 1))
    return fresh_url


@pytest.fixture
async def broker(url: str) -> AsyncIterator[PostgresBroker]:
    b = PostgresBroker(f"{url}?poll=0.1", visibility_timeout=5.0)
    try:
        yield b
    finally:
        await b.aclose()


# -- the URL and the scheme -------------------------------------------------------------------


def test_both_schemes_open_the_postgres_broker_and_options_are_read() -> None:
    for scheme in ("postgresql", "postgres"):
        b = open_broker(f"{scheme}://u:secret@db:5433/app?poll=2&schema=jobs", visibility_timeout=7)
        assert isinstance(b, PostgresBroker)
        assert (b.poll, b.settings.schema, b.visibility_timeout) == (2.0, "jobs", 7)
        assert "secret" not in repr(b)
    # Our options are taken out; libpq's (sslmode) go on to asyncpg.
    s = parse_url("postgresql://u@h/db?sslmode=require&pool_size=3&command_timeout=2")
    assert (s.pool_size, s.command_timeout) == (3, 2.0)
    assert s.dsn == "postgresql://u@h/db?sslmode=require"


@pytest.mark.parametrize(
    "query",
    ["schema=Robert'); DROP TABLE x;--", "schema=", "poll=soon", "poll=0", "pool_size=0"],
)
def test_bad_options_are_config_errors(query: str) -> None:
    with pytest.raises(ConfigError, match="postgresql://"):
        PostgresBroker(f"postgresql://h/db?{query}")


# -- migrations and the schema check ----------------------------------------------------------


async def test_an_unmigrated_database_is_refused_with_what_to_run(fresh_url: str) -> None:
    app = App(fresh_url, visibility_timeout=5)
    with pytest.raises(ConfigError, match=r"schema version 0.*aioworkers migrate MODULE:ATTR"):
        await app.broker.publish("q", [b"x"])
    # Nothing was created: the check reads, it never alters.
    conn = await asyncpg.connect(fresh_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('public.aioworkers_jobs')") is None
    finally:
        await conn.close()

    @app.task
    async def noop() -> None:
        pass

    # The worker stops at its first fetch with the same error.
    with pytest.raises(ConfigError, match="aioworkers migrate"):
        async with asyncio.timeout(10):
            await app.worker(poll=0.1).run(burst=True)
    await app.aclose()


async def test_migrate_applies_once_and_concurrent_migrations_wait(fresh_url: str) -> None:
    apps = [App(fresh_url) for _ in range(3)]
    results = await asyncio.gather(*(a.migrate() for a in apps))
    assert sorted(results) == [[], [], list(range(1, SCHEMA_VERSION + 1))]
    assert await apps[0].migrate() == []
    await apps[0].broker.publish("q", [b"x"])
    assert await apps[0].stats("q") == QueueDepth(ready=1)
    for a in apps:
        await a.aclose()


async def test_a_schema_newer_than_this_aioworkers_is_refused(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO aioworkers_schema (version, what) VALUES ($1, 'future')",
            SCHEMA_VERSION + 1,
        )
    finally:
        await conn.close()
    app = App(url)
    with pytest.raises(ConfigError, match=r"newer.*upgrade aioworkers"):
        await app.stats()
    with pytest.raises(ConfigError, match="upgrade aioworkers"):
        await app.migrate()
    await app.aclose()


async def test_a_schema_of_its_own(fresh_url: str) -> None:
    b = PostgresBroker(f"{fresh_url}?schema=jobs_here", visibility_timeout=5)
    try:
        assert await b.migrate() == [1, 2]
        await b.publish("q", [b"x"])
        (d,) = await b.fetch("q", max_messages=5, wait=0)
        assert await b.ack([d]) == []
        conn = await asyncpg.connect(fresh_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM jobs_here.aioworkers_schema") == 2
            assert await conn.fetchval("SELECT to_regclass('public.aioworkers_jobs')") is None
        finally:
            await conn.close()
    finally:
        await b.aclose()


def test_the_migrate_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aioworkers import cli

    (tmp_path / "pgapp.py").write_text("import aioworkers\napp = aioworkers.App('memory://')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    manager = postgres_database()
    runner = asyncio.Runner()
    with runner:
        url = runner.run(manager.__aenter__())
        try:
            out = _run_cli(cli, ["migrate", "pgapp:app", "--broker", url])
            assert out == (0, f"applied migrations 1, 2 to {url}\n")
            assert _run_cli(cli, ["migrate", "pgapp:app", "--broker", url]) == (
                0,
                f"nothing to migrate on {url}\n",
            )
            assert _run_cli(cli, ["migrate", "pgapp:app"]) == (
                0,
                "nothing to migrate on memory://\n",
            )
        finally:
            runner.run(manager.__aexit__(None, None, None))


def _run_cli(cli: object, argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    sys.modules.pop("pgapp", None)  # a fresh App each time, as in a new process
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)  # type: ignore[attr-defined]
    return code, out.getvalue()


# -- errors -----------------------------------------------------------------------------------


class _Fake(asyncpg.PostgresError):
    pass


@pytest.mark.parametrize(
    ("sqlstate", "expected"),
    [
        ("08006", BrokerUnavailable),  # connection failure
        ("40001", BrokerUnavailable),  # serialization failure
        ("40P01", BrokerUnavailable),  # deadlock
        ("53300", BrokerUnavailable),  # too many connections
        ("57P01", BrokerUnavailable),  # admin shutdown (failover)
        ("57P03", BrokerUnavailable),  # cannot connect now (starting up)
        ("57014", BrokerUnavailable),  # statement timeout
        ("25006", BrokerUnavailable),  # read-only: a standby after a failover
        ("28P01", ConfigError),  # bad password
        ("3D000", ConfigError),  # no such database
        ("42P01", ConfigError),  # no such table
        ("42501", ConfigError),  # permission denied
        ("22P02", ConfigError),  # anything else
    ],
)
def test_the_error_table(sqlstate: str, expected: type[Exception]) -> None:
    error = _Fake("boom")
    error.sqlstate = sqlstate  # type: ignore[attr-defined]
    with pytest.raises(expected, match=sqlstate), ERRORS:
        raise error


async def test_errors_from_a_real_server_say_what_to_fix(url: str) -> None:
    missing_db = url.rsplit("/", 1)[0] + "/no_such_database_here"
    b = PostgresBroker(missing_db, visibility_timeout=5)
    with pytest.raises(ConfigError, match="create the database"):
        await b.depth("q")
    await b.aclose()
    # Nothing listens on port 1: refused, which is transient.
    b = PostgresBroker("postgresql://postgres@127.0.0.1:1/x?connect_timeout=2")
    with pytest.raises(BrokerUnavailable, match="cannot connect"):
        await b.publish("q", [b"x"])
    await b.aclose()


# -- reconnecting -----------------------------------------------------------------------------


async def test_connections_cut_by_the_server_side_are_replaced(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with Proxy("127.0.0.1", 5432) as proxy:
        via = url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        b = PostgresBroker(f"{via}?poll=0.2", visibility_timeout=5)
        other = PostgresBroker(url, visibility_timeout=5)
        try:
            await b.publish("q", [b"1"])
            assert len(await b.fetch("q", max_messages=5, wait=0.1)) == 1  # LISTENing now
            caplog.set_level(logging.INFO, "aioworkers")
            await proxy.close_all()  # a restart, as the client sees it
            # A call on a cut connection fails as transient; the next one reconnects.
            with pytest.raises(BrokerUnavailable):
                await b.depth("q")
            assert (await b.depth("q")).in_flight == 1
            # A job committed while the listener was down is still found: by the poll
            # at first, and by NOTIFY once the listener is back.
            await other.publish("q", [b"2"])
            (got,) = await b.fetch("q", max_messages=5, wait=5)
            assert got.body == b"2"
            await b.ack([got])
        finally:
            await b.aclose()
            await other.aclose()


async def test_a_cancelled_fetch_hands_its_rows_back(broker: PostgresBroker) -> None:
    await broker.publish("q", [b"a", b"b"])
    real = broker._take_rows
    taken = asyncio.Event()

    async def slow(*args: object, **kwargs: object) -> object:
        rows = await real(*args, **kwargs)  # type: ignore[arg-type]
        taken.set()
        await asyncio.sleep(0.2)  # the fetch is cancelled meanwhile
        return rows

    broker._take_rows = slow  # type: ignore[method-assign]
    fetch = asyncio.create_task(broker.fetch("q", max_messages=5, wait=0))
    await taken.wait()
    fetch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    broker._take_rows = real  # type: ignore[method-assign]
    await broker.aclose()  # waits for the hand-back
    got = await broker.fetch("q", max_messages=5, wait=1)
    assert sorted(d.body for d in got) == [b"a", b"b"]
    assert all(d.count == 1 for d in got)  # a hand-back is not a delivery


# -- durability -------------------------------------------------------------------------------


@pytest.mark.parametrize("async_commit", [False, True])
async def test_every_commit_is_durable_unless_async_commit_is_asked_for(
    url: str, async_commit: bool
) -> None:
    """By default every statement keeps the server's ``synchronous_commit`` (a job acked
    stays acked through a server crash). With ``?async_commit=on``, take, extend, ack and
    release set it off for their own transaction (a crash can then forget the last ~0.6 s
    of leases and acks: those jobs run again); publish, retry and dead letter stay durable,
    so an enqueue is on disk when it returns. Each statement runs here inside an explicit
    transaction, to read the setting it left for the commit."""
    sql = Statements("public", async_commit=async_commit)
    assert parse_url(f"{url}?async_commit={'on' if async_commit else 'off'}").async_commit is (
        async_commit
    )
    lease = "off" if async_commit else "on"
    conn = await asyncpg.connect(url)

    async def setting_after(statement: str, *args: object) -> str:
        async with conn.transaction():
            await conn.fetch(statement, *args)
            setting = await conn.fetchval("SHOW synchronous_commit")
        # Transaction-local: the session's setting is untouched.
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        return str(setting)

    try:
        assert await setting_after(sql.publish, "q", [b"a", b"b", b"c"], 0.0, "q") == "on"
        assert await setting_after(sql.take, "q", 3, 7, 30.0, True) == lease
        assert await setting_after(sql.take, "empty", 3, 7, 30.0, True) == lease
        assert await setting_after(sql.extend, [1, 2, 3], [7, 7, 7], 30.0) == lease
        assert await setting_after(sql.ack, [1], [7]) == lease
        assert await setting_after(sql.release, [2], [7]) == lease
        assert await setting_after(sql.retry, 3, 7, b"c2", 0.0) == "on"
        assert await setting_after(sql.dead_letter, 4, 7, "{}") == "on"  # not leased: no row
        assert await conn.fetchval("SELECT count(*) FROM aioworkers_jobs") == 2  # b, c2
    finally:
        await conn.close()


def test_async_commit_must_be_on_or_off() -> None:
    assert parse_url("postgresql://h/db").async_commit is False
    with pytest.raises(ConfigError, match=r"\?async_commit= must be on or off, got 'maybe'"):
        parse_url("postgresql://h/db?async_commit=maybe")


# -- idle fetches -----------------------------------------------------------------------------


async def test_a_fetch_that_took_the_last_ready_rows_waits_for_a_notification(url: str) -> None:
    """After a fetch that took fewer rows than it asked for, the next one waits for a NOTIFY
    (or the queue's next row due) instead of looking again at once: one statement per job
    when jobs trickle in, not two. A delayed row already there is still started when due."""
    broker = PostgresBroker(f"{url}?poll=30", visibility_timeout=30)
    producer = PostgresBroker(url)
    looks = 0
    real = broker._take_rows

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal looks
        looks += 1
        return await real(*args, **kwargs)

    broker._take_rows = counted  # type: ignore[method-assign]
    try:
        # Listening first: while the LISTEN connection is not up, every fetch looks.
        assert await broker.fetch("q", max_messages=10, wait=0.01) == []
        for _ in range(500):
            if broker._listener.up:
                break
            await asyncio.sleep(0.01)
        # The fetch above may have looked again once the listener was up and found the
        # queue dry: its next fetch then rightly waits for a notification. One comes (as if
        # a job had been published), so the next fetch looks.
        broker._notify("q")
        looks = 0
        # Rows already there, no notification on its way (one arriving during a look would
        # make the next fetch look again at once, rightly).
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(Statements("public").publish, "q", [b"a"], 0.0, None)
            await conn.execute(Statements("public").publish, "q", [b"later"], 0.5, None)
        finally:
            await conn.close()
        (a,) = await broker.fetch("q", max_messages=10, wait=5)
        assert (a.body, looks) == (b"a", 1)
        # The look that took "a" also saw when "later" is due: the next fetch sleeps until
        # then (a real timer: the delay is what is under test; poll is 30 s).
        started = time.monotonic()
        (later,) = await broker.fetch("q", max_messages=10, wait=5)
        assert later.body == b"later"
        assert 0.3 < time.monotonic() - started < 3.0
        assert looks == 2
        # Nothing due now: the fetch waits for the producer's NOTIFY, and looks once.
        fetching = asyncio.create_task(broker.fetch("q", max_messages=10, wait=5))
        await producer.publish("q", [b"b"])
        (b,) = await fetching
        assert (b.body, looks) == (b"b", 3)
        await broker.ack([a, later, b])
    finally:
        await broker.aclose()
        await producer.aclose()
