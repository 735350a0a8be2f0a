"""What the conformance suite cannot say about sqlite://: URLs, errors that name the fix,
leases that a wait for the lock does not shorten, closing under load, several processes
on one new file, and reads that do not queue behind the writer."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from aioworkers import App, BrokerUnavailable, ConfigError, DeadLetter, QueueDepth
from aioworkers.brokers.sqlite import SqliteBroker

from .conftest import fetch_n


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "not a sqlite:/// file URL"),
        ("sqlite:///", "needs a database file"),
        ("sqlite:///:memory:", "needs a database file"),
        ("sqlite://host/jobs.db", "not a sqlite:/// file URL"),
        ("sqlite:/tmp/jobs.db", "not a sqlite:/// file URL"),
        ("sqlite:///jobs#1.db", "not a sqlite:/// file URL"),
        ("sqlite:///jobs.db?poll", "?poll= must be seconds"),
        ("sqlite:///jobs.db?poll=0", "?poll= must be at least 0.001"),
        ("sqlite:///jobs.db?poll=nan", "?poll= must be at least"),
        ("sqlite:///jobs.db?timeout=-1", "?timeout= must be at least"),
        ("sqlite:///jobs.db?prefix=x", "no option 'prefix'"),
    ],
)
def test_bad_urls_fail_at_start_up_saying_what_to_fix(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        App(url).broker  # noqa: B018


def test_paths_are_absolute_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert SqliteBroker("sqlite:///jobs.db").path == tmp_path / "jobs.db"
    assert SqliteBroker("sqlite:///sub/my%20jobs.db").path == tmp_path / "sub/my jobs.db"
    assert SqliteBroker("sqlite:////var/tmp/x.db").path == Path("/var/tmp/x.db")
    # The default: a file where the app was created, even if the process moves later.
    app = App()
    monkeypatch.chdir("/")
    broker = app.broker
    assert isinstance(broker, SqliteBroker)
    assert broker.path == tmp_path / "aioworkers.db"


async def test_a_path_that_is_no_database_file_is_a_config_error(tmp_path: Path) -> None:
    not_a_db = tmp_path / "app.py"
    not_a_db.write_text("print('hello')\n" * 100)
    for path, message in [
        (not_a_db, "not a database"),
        (tmp_path, "unable to open"),
        (not_a_db / "jobs.db", "cannot create its directory"),
    ]:
        broker = SqliteBroker(f"sqlite:///{path}")
        with pytest.raises(ConfigError, match=message) as info:
            await broker.publish("q", [b"x"])
        assert str(path) in str(info.value)
        await broker.aclose()


async def test_a_lock_held_past_the_timeout_is_broker_unavailable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/jobs.db?timeout=0.1"
    broker = SqliteBroker(url)
    await broker.publish("q", [b"x"])  # creates the file
    other = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(BrokerUnavailable, match="locked"):
            await broker.publish("q", [b"y"])
    finally:
        other.execute("ROLLBACK")
        other.close()
    await broker.publish("q", [b"y"])
    assert await broker.depth("q") == QueueDepth(ready=2)
    await broker.aclose()


async def test_a_wait_for_the_lock_does_not_shorten_the_lease(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    broker = SqliteBroker(f"sqlite:///{path}", visibility_timeout=0.5)
    await broker.publish("q", [b"job"])
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    # Longer than the lease: a lease timed from before the wait would be over on arrival.
    unlock = threading.Timer(0.8, lambda: other.execute("COMMIT"))
    unlock.start()
    try:
        (mine,) = await broker.fetch("q", max_messages=1, wait=0)
    finally:
        unlock.join()
        other.close()
    assert await broker.fetch("q", max_messages=1, wait=0) == []  # still leased
    assert await broker.ack([mine]) == []
    await broker.aclose()


async def test_calls_made_while_closing_run_in_order_and_reopen(tmp_path: Path) -> None:
    broker = SqliteBroker(f"sqlite:///{tmp_path}/jobs.db")
    await broker.publish("q", [b"%d" % i for i in range(50)])
    await broker.depth("q")  # both threads started
    threads = threading.active_count()
    got = await fetch_n(broker, "q", 50, within=2)
    closing = asyncio.ensure_future(broker.aclose())
    acks = [asyncio.ensure_future(broker.ack([d])) for d in got]
    await closing
    assert await asyncio.gather(*acks) == [[]] * 50
    assert await broker.depth("q") == QueueDepth()
    await broker.aclose()
    assert threading.active_count() <= threads  # reopened on the same threads


def _open_and_publish(path: str, start: float) -> None:
    async def main() -> None:
        broker = SqliteBroker(f"sqlite:///{path}")
        await broker.publish("q", [b"x"])
        await broker.aclose()

    time.sleep(max(0.0, start - time.time()))
    asyncio.run(main())


async def test_processes_creating_one_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 1.5  # after the interpreters are up, all at once
    procs = [
        ctx.Process(target=_open_and_publish, args=(str(tmp_path / "new.db"), start))
        for _ in range(6)
    ]
    for p in procs:
        p.start()
    for p in procs:
        await asyncio.to_thread(p.join, 30)
    assert [p.exitcode for p in procs] == [0] * 6
    broker = SqliteBroker(f"sqlite:///{tmp_path}/new.db")
    assert await broker.depth("q") == QueueDepth(ready=6)
    await broker.aclose()


async def test_reads_do_not_hold_up_fetches(tmp_path: Path) -> None:
    broker = SqliteBroker(f"sqlite:///{tmp_path}/jobs.db")
    await broker.publish("q", [b"x"] * 10)
    # A slow read (a count over a deep queue, a long DLQ listing) on the reading thread.
    reading = asyncio.ensure_future(broker._file.read(lambda db: time.sleep(1.0)))
    await asyncio.sleep(0.05)
    got = await broker.fetch("q", max_messages=10, wait=0)
    assert len(got) == 10
    assert not reading.done()  # the fetch did not wait for it
    await reading
    assert await broker.depth("q") == QueueDepth(in_flight=10)
    await broker.aclose()


def test_the_default_broker_is_a_file_shared_by_processes(tmp_path: Path) -> None:
    assert SqliteBroker("sqlite:///aioworkers.db").path.name == "aioworkers.db"


async def test_totals_count_what_entered_and_left_each_queue(tmp_path: Path) -> None:
    broker = SqliteBroker(f"sqlite:///{tmp_path}/jobs.db")
    await broker.publish("q", [b"a", b"b", b"c"])
    await broker.publish("other", [b"x"])
    a, b, c = await fetch_n(broker, "q", 3, within=2)
    await broker.ack([a])
    await broker.retry(b, body=b"b again", delay=0)
    await broker.dead_letter(
        c, DeadLetter(id="c", task="t", reason="rejected", error=None, attempts=1)
    )
    assert await broker.ack([a]) == []  # acked already: counted once
    assert await broker.totals("q") == {"added": 4, "left": 3, "dead": 1}
    assert await broker.totals("other") == {"added": 1, "left": 0, "dead": 0}
    assert await broker.totals("nothing") == {"added": 0, "left": 0, "dead": 0}
    await broker.aclose()


def test_extended_error_codes_are_sorted_by_their_primary_code() -> None:
    from aioworkers._sqlite import transient

    def error(code: int) -> sqlite3.OperationalError:
        exc = sqlite3.OperationalError("x")
        exc.sqlite_errorcode = code  # type: ignore[attr-defined]
        return exc

    io_write = sqlite3.SQLITE_IOERR | (3 << 8)  # SQLITE_IOERR_WRITE
    busy_snapshot = sqlite3.SQLITE_BUSY | (2 << 8)  # SQLITE_BUSY_SNAPSHOT
    assert transient(error(io_write))
    assert transient(error(busy_snapshot))
    assert not transient(error(sqlite3.SQLITE_CANTOPEN))
    assert not transient(error(sqlite3.SQLITE_READONLY | (1 << 8)))


async def test_an_idle_worker_gives_freed_pages_back(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    broker = SqliteBroker(f"sqlite:///{path}")
    await broker.publish("q", [b"x" * 4000] * 2000)
    got = await fetch_n(broker, "q", 2000, within=10)
    assert await broker.ack(got) == []

    def pages() -> tuple[int, int]:
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
            return db.execute("PRAGMA page_count").fetchone()[0], db.execute(
                "PRAGMA freelist_count"
            ).fetchone()[0]

    total, free = pages()
    assert free > 1000  # the drained jobs' pages
    broker._vacuum_at = 0.0  # due now (once a minute otherwise)
    assert await broker.fetch("q", max_messages=1, wait=0) == []  # an idle poll
    await broker.aclose()  # checkpoints the WAL into the file
    total_after, free_after = pages()
    assert free_after == free - 1000  # 1000 pages a minute
    assert total_after <= total - 1000  # the file shrank


async def test_a_fetch_cancelled_during_close_hands_its_rows_back_and_stays_closed(
    tmp_path: Path,
) -> None:
    broker = SqliteBroker(f"sqlite:///{tmp_path}/jobs.db", visibility_timeout=60)
    await broker.publish("q", [b"a", b"b"])
    fetch = asyncio.ensure_future(broker.fetch("q", max_messages=2, wait=0))
    await asyncio.sleep(0)  # the take is in the writer thread
    fetch.cancel()
    await broker.aclose()
    await asyncio.sleep(0.1)  # the hand-back ran, after the close
    assert broker._file._db is None  # closed again, not left open
    assert await broker.depth("q") == QueueDepth(ready=2)  # not leased for 60 s
    got = await broker.fetch("q", max_messages=2, wait=0)
    assert [d.count for d in got] == [1, 1]  # the cancelled take did not count
    await broker.aclose()


async def test_an_app_given_a_sqlite_broker_keeps_its_keys_in_that_file(tmp_path: Path) -> None:
    from aioworkers.idempotency.sqlite import SqliteStore

    app = App(SqliteBroker(f"sqlite:///{tmp_path}/jobs.db"))
    assert isinstance(app.idempotency, SqliteStore)
    assert app.idempotency.path == f"{tmp_path}/jobs.db"
    await app.aclose()


def test_a_relative_sqlite_store_url_is_taken_from_where_the_app_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aioworkers.idempotency.sqlite import SqliteStore

    monkeypatch.chdir(tmp_path)
    app = App("memory://", idempotency="sqlite:///keys.db")
    monkeypatch.chdir("/")
    assert isinstance(app.idempotency, SqliteStore)
    assert app.idempotency.path == f"{tmp_path}/keys.db"


def test_a_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    broker = SqliteBroker(f"sqlite:///{tmp_path}/jobs.db")
    asyncio.run(broker.publish("q", [b"parent"]))  # the parent's threads and connections

    def child() -> None:
        async def main() -> None:
            await broker.publish("q", [b"child"])  # would hang on the parent's threads
            await broker.aclose()

        asyncio.run(main())

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(20)
    assert proc.exitcode == 0

    async def depth() -> QueueDepth:
        found = await broker.depth("q")
        await broker.aclose()
        return found

    assert asyncio.run(depth()) == QueueDepth(ready=2)
