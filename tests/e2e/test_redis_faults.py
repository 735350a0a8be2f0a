"""Redis failing under a running worker: error replies (BUSY, MISCONF, LOADING, NOPERM,
NOSCRIPT) from a redis-server of the test's own, and a black-holed connection to the
shared one. The worker rides out what is transient and every job runs once; what only a
configuration change fixes stops it at start-up, saying what to change."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rexc

from aioworkers import App, Call, ConfigError, QueueDepth, current_job
from aioworkers.brokers import redis as redis_broker
from aioworkers.brokers.base import DeadLetter
from aioworkers.brokers.redis import RedisBroker
from aioworkers.envelope import Envelope, encode, new_id, now_ms
from aioworkers.idempotency.redis import RedisStore
from aioworkers.store.redis import RedisStore as StateStore

from ..proxy import Proxy
from ..services import REDIS, delete_prefix, ensure
from .harness import free_port, wait_until

JOBS = 20


class Server:
    """A redis-server of the test's own (no persistence unless asked), killed afterwards."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.port = free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "no",
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

        async def up() -> bool:
            client = self.client()
            try:
                return bool(await client.ping())
            except rexc.ConnectionError:
                return False
            finally:
                await client.aclose()

        await wait_until(up, within=20, what=f"redis-server on port {self.port}")

    def client(self, **options: Any) -> Any:
        return aioredis.from_url(self.url, **options)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):  # as tests/services.py: a missing server fails CI
            pytest.fail("redis-server is not installed (CI is set)", pytrace=False)
        pytest.skip("redis-server is not installed")
    servers: list[Server] = []

    async def start(*args: str) -> Server:
        servers.append(Server(tmp_path, *args))
        await servers[-1].start()
        return servers[-1]

    yield start
    for server in servers:
        await server.kill()


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and text in r.getMessage()
    ]


@dataclass
class Runs:
    """What the ``job`` task of `counting_app` saw: runs by job id, and each run's attempt."""

    by_id: Counter[str] = field(default_factory=Counter)
    attempts: list[int] = field(default_factory=list)


def counting_app(url: str, **options: Any) -> tuple[App, Runs]:
    """An app with a ``job(n)`` task that records its runs."""
    app = App(url, **options)
    runs = Runs()

    @app.task(idempotent="idempotency" in options)
    async def job(n: int) -> None:
        runs.by_id[current_job().id] += 1
        runs.attempts.append(current_job().attempt)
        await asyncio.sleep(0.05)

    return app, runs


def calls(n: int) -> list[Call]:
    return [Call("job", (i,)) for i in range(n)]


def check(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return condition()

    return check


async def check_every_job_ran_once(app: App, runs: Runs, ids: list[str]) -> None:
    await wait_until(check(lambda: len(runs.by_id) == len(ids)), within=30, what="every run")

    async def empty() -> bool:
        return await app.stats() == QueueDepth()

    await wait_until(empty, within=30, what="an empty queue (every ack in)")
    assert runs.by_id == dict.fromkeys(ids, 1)


# -- BUSY: another client's slow script ---------------------------------------------------------


@asynccontextmanager
async def busy(server: Server) -> AsyncIterator[None]:
    """Another client runs a script that never ends: every other command gets BUSY until
    SCRIPT KILL on the way out."""
    admin = server.client()
    await admin.ping()  # connected before the server turns busy
    blocker = server.client(socket_timeout=None)
    script = asyncio.create_task(blocker.eval("while true do end", 0))

    async def is_busy() -> bool:
        try:
            await admin.ping()
        except rexc.ResponseError as exc:
            return str(exc).startswith("BUSY")
        return False

    try:
        await wait_until(is_busy, within=5, what="the server to turn BUSY")
        yield
    finally:
        with contextlib.suppress(rexc.ResponseError):  # NOTBUSY: it ended already
            await admin.script_kill()
        with contextlib.suppress(rexc.ResponseError):  # "Script killed by user"
            await script
        await blocker.aclose()
        await admin.aclose()


async def test_a_busy_server_is_waited_out_and_every_job_runs_once(
    start_server: Callable[..., Awaitable[Server]], caplog: pytest.LogCaptureFixture
) -> None:
    # BUSY comes once a script has run lua-time-limit ms (busy-reply-threshold in 7.0+).
    server = await start_server("--lua-time-limit", "50")
    app, runs = counting_app(f"{server.url}?prefix=busy")
    ids = await app.enqueue_many(calls(JOBS))
    async with app.worker(concurrency=4, poll=0.2) as worker:
        await wait_until(check(lambda: len(runs.by_id) >= 4), within=10, what="a few runs")
        async with busy(server):
            await wait_until(
                check(lambda: bool(warnings_with(caplog, "BUSY"))),
                within=10,
                what="the worker to meet BUSY",
            )
        await check_every_job_ran_once(app, runs, ids)
        assert worker.state == "RUNNING"
    assert worker.counts == {"ok": JOBS}
    await app.aclose()


# -- MISCONF: writes refused after a failed snapshot ----------------------------------------


async def bgsave(client: Any, *, ok: bool) -> None:
    await client.bgsave()

    async def finished() -> bool:
        info = await client.info("persistence")
        status = "ok" if ok else "err"
        return bool(not info["rdb_bgsave_in_progress"] and info["rdb_last_bgsave_status"] == status)

    await wait_until(finished, within=10, what=f"a BGSAVE that ends {'ok' if ok else 'in error'}")


async def test_writes_refused_by_misconf_are_waited_out_and_every_job_runs_once(
    start_server: Callable[..., Awaitable[Server]],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    # A save point, so that a failed save stops writes; `dir` may be changed at runtime.
    server = await start_server("--save", "3600 1", "--enable-protected-configs", "yes")
    admin = server.client()
    app, runs = counting_app(f"{server.url}?prefix=misconf")
    ids = await app.enqueue_many(calls(JOBS))
    async with app.worker(concurrency=4, poll=0.2) as worker:
        await wait_until(check(lambda: len(runs.by_id) >= 4), within=10, what="a few runs")
        shutil.rmtree(server.dir)  # the disk "fails": the next snapshot can't be written
        await bgsave(admin, ok=False)
        await wait_until(
            check(lambda: bool(warnings_with(caplog, "MISCONF"))),
            within=10,
            what="the worker to meet MISCONF",
        )
        # The operator fixes the disk; the server takes writes once a save succeeds.
        fixed = tmp_path / "fixed"
        fixed.mkdir()
        await admin.config_set("dir", str(fixed))
        await bgsave(admin, ok=True)
        await check_every_job_ran_once(app, runs, ids)
        assert worker.state == "RUNNING"
    assert worker.counts == {"ok": JOBS}
    await admin.aclose()
    await app.aclose()


# -- the idempotency store: LOADING and BUSY defer claims -----------------------------------


@asynccontextmanager
async def loading(server: Server) -> AsyncIterator[None]:
    """The server reloads its data slowly (DEBUG RELOAD with a per-key delay): every other
    command gets LOADING until it is done."""
    admin = server.client(socket_timeout=None)
    await admin.execute_command("DEBUG", "POPULATE", 4000, "filler")
    await admin.config_set("key-load-delay", 500)  # microseconds a key: about 2 s
    reload = asyncio.create_task(admin.execute_command("DEBUG", "RELOAD"))
    probe = server.client()

    async def is_loading() -> bool:
        try:
            await probe.ping()
        except rexc.BusyLoadingError:
            return True
        return False

    try:
        await wait_until(is_loading, within=5, what="the server to be LOADING")
        yield
        await reload
    finally:
        reload.cancel()
        await probe.aclose()
        await admin.aclose()


@pytest.mark.parametrize("fault", ["loading", "busy"])
async def test_a_store_loading_or_busy_defers_claims_without_using_attempts(
    start_server: Callable[..., Awaitable[Server]],
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    ensure(REDIS)
    server = await start_server(
        "--lua-time-limit", "50", "--enable-debug-command", "yes",
        "--loading-process-events-interval-bytes", "1024",
    )  # fmt: skip
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    # The broker on the shared Redis, the keys on the server that fails: only the store does.
    app, runs = counting_app(
        f"redis://{REDIS.host}:{REDIS.port}/0?prefix={prefix}",
        idempotency=f"{server.url}?prefix=keys",
        max_deliveries=2,
        visibility_timeout=3.0,  # deferred for a third of it: about 1 s
    )
    try:
        async with app.worker(concurrency=4, poll=0.2) as worker:
            async with loading(server) if fault == "loading" else busy(server):
                # Enqueued now, so that every claim meets the fault.
                ids = await app.enqueue_many(calls(JOBS))
                await wait_until(
                    check(lambda: worker.counts.get("deferred", 0) >= 4),
                    within=10,
                    what="claims deferred",
                )
            await check_every_job_ran_once(app, runs, ids)
        assert runs.attempts == [1] * JOBS  # a deferred job did not use an attempt
        assert worker.counts["ok"] == JOBS
        assert set(worker.counts) == {"ok", "deferred"}  # nothing dead, lost or failed
        assert await app.dlq().list() == []
    finally:
        await app.aclose()
        await delete_prefix(prefix)


# -- NOPERM, NOSCRIPT ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "named"),
    [
        (["+@all", "-xack"], "XACK"),
        (["+@all", "-xautoclaim", "-hset"], "XAUTOCLAIM, HSET"),
        (["+@all", "-@scripting"], "evalsha"),
        (["+@all", "resetkeys", "~other:*"], "access one of the keys"),
    ],
)
async def test_a_user_missing_a_permission_stops_the_worker_at_start_saying_what(
    start_server: Callable[..., Awaitable[Server]], rules: list[str], named: str
) -> None:
    server = await start_server()
    admin = server.client()
    await admin.acl_setuser("worker", enabled=True, passwords=["+secret"], keys=["*"])
    await admin.execute_command("ACL", "SETUSER", "worker", *rules)
    url = f"redis://worker:secret@127.0.0.1:{server.port}/0?prefix=perm"
    admin_broker = RedisBroker(f"{server.url}?prefix=perm")
    await admin_broker.publish("default", [b"{}"])
    await admin_broker.aclose()
    app, runs = counting_app(url)
    worker = app.worker(concurrency=2, poll=0.2)
    with pytest.raises(BaseException) as info:  # noqa: PT011 (a ConfigError, maybe grouped)
        await asyncio.wait_for(worker.run(), 20)
    (error,) = leaves(info.value)
    assert isinstance(error, ConfigError)
    assert named in str(error)
    assert "ACL SETUSER" in str(error)  # what to do about it
    assert "secret" not in str(error)
    assert runs.by_id == {}  # stopped before running anything: nothing taken, nothing lost
    assert await admin.xlen("perm:{default}:stream") == 1
    assert await admin.keys("perm:*probe*") == []  # the permission check left nothing behind
    await admin.aclose()
    await app.aclose()


async def test_the_acl_rules_the_error_names_are_enough_for_everything(
    start_server: Callable[..., Awaitable[Server]],
) -> None:
    server = await start_server()
    admin = server.client()
    await admin.execute_command(
        "ACL", "SETUSER", "worker", "on", ">secret", "~acl:*", *redis_broker.ACL_RULES
    )
    url = f"redis://worker:secret@127.0.0.1:{server.port}/0"
    broker = RedisBroker(f"{url}?prefix=acl", visibility_timeout=30)
    store = RedisStore(f"{url}?prefix=acl:keys")
    await broker.publish("q", [b"a", b"b", b"c"])
    await broker.publish("q", [b"later"], delay=60)
    a, b, c = await broker.fetch("q", max_messages=3, wait=0)
    assert await broker.extend([a, b, c], lease=30) == []
    assert await broker.ack([a]) == []
    await broker.retry(b, body=b"b2", delay=0)
    await broker.dead_letter(
        c, DeadLetter(id="c", task="job", reason="rejected", error=None, attempts=1)
    )
    await broker.release(await broker.fetch("q", max_messages=1, wait=0))
    assert await broker.depth("q") == QueueDepth(ready=1, delayed=1, dead=1)
    assert await broker.totals("q") == {"added": 5, "left": 4, "dead": 1}
    (letter,) = await broker.dead_letters("q")
    assert await broker.remove_dead_letters("q", [letter.entry_id]) == 1
    assert await store.claim("k", "me", lease=5) == "claimed"
    assert await store.extend([("k", "me")], lease=5) == []
    assert await store.complete("k", "me", ttl=5)
    assert await store.claim("k2", "me", lease=5) == "claimed"
    assert await store.release("k2", "me")
    # The cancel marks of a state store on the same server, read as the fetch blocks.
    marks = StateStore(f"{url}?prefix=acl:state")
    assert broker.screen_cancel_marks(*marks.cancel_marks_at())
    assert await broker.fetch_screened("p", max_messages=1, wait=0) == ([], [])
    job = Envelope(new_id(), "t", [], {}, enqueued_at=now_ms())
    await marks.mark_cancelled(job.id, ttl=60)

    async def publish_later() -> None:
        await asyncio.sleep(0.3)  # the fetch blocks by then
        await broker.publish("p", [encode(job)])

    later = asyncio.create_task(publish_later())
    got, screened = await broker.fetch_screened("p", max_messages=1, wait=5.0)
    await later
    assert screened == [(job.id, True)]
    assert await broker.ack(got) == []
    await marks.aclose()
    await broker.aclose()
    await store.aclose()
    await admin.aclose()


def leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


async def test_scripts_flushed_under_a_running_broker_are_loaded_again(
    start_server: Callable[..., Awaitable[Server]],
) -> None:
    server = await start_server()
    admin = server.client()
    broker = RedisBroker(f"{server.url}?prefix=flush", visibility_timeout=30)
    store = RedisStore(server.url)
    await broker.publish("q", [b"a", b"b"])
    (a,) = await broker.fetch("q", max_messages=1, wait=0)
    assert await store.claim("k", "me", lease=5) == "claimed"
    await admin.script_flush()  # a SCRIPT FLUSH, or a failover to a replica without them
    assert await broker.extend([a], lease=30) == []
    assert await broker.ack([a]) == []
    (b,) = await broker.fetch("q", max_messages=1, wait=0)  # a pipeline with a script
    await broker.retry(b, body=b"b2", delay=0)
    assert await store.complete("k", "me", ttl=5)
    (b2,) = await broker.fetch("q", max_messages=1, wait=0)
    assert b2.body == b"b2"
    assert await broker.ack([b2]) == []
    assert await broker.depth("q") == QueueDepth()
    await broker.aclose()
    await store.aclose()
    await admin.aclose()


async def test_a_blocking_fetch_reads_marks_after_the_server_lost_its_scripts(
    start_server: Callable[..., Awaitable[Server]],
) -> None:
    # The script sent behind a blocking read is never loaded on its own (a pipeline sends
    # it by hash): the first use on a fresh server, and every use after a SCRIPT FLUSH,
    # finds it missing, loads it, and still reads the marks of what the read delivered.
    server = await start_server()
    admin = server.client()
    broker = RedisBroker(f"{server.url}?prefix=flush", visibility_timeout=30)
    producer = RedisBroker(f"{server.url}?prefix=flush", visibility_timeout=30)
    store = StateStore(f"{server.url}?prefix=flush:store")
    assert broker.screen_cancel_marks(*store.cancel_marks_at())
    for flush in (False, True):
        if flush:
            await admin.script_flush()
        envs = [Envelope(new_id(), "t", [], {}, enqueued_at=now_ms()) for _ in range(2)]
        await store.mark_cancelled(envs[0].id, ttl=60)

        async def publish_later(envs: list[Envelope] = envs) -> None:
            await asyncio.sleep(0.3)  # the fetch blocks by then
            await producer.publish("q", [encode(env) for env in envs])

        later = asyncio.create_task(publish_later())
        got, screened = await broker.fetch_screened("q", max_messages=10, wait=5.0)
        await later
        assert [d.body for d in got] == [encode(env) for env in envs]
        assert screened == [(envs[0].id, True), (envs[1].id, False)]
        assert await broker.ack(got) == []
    await broker.aclose()
    await producer.aclose()
    await store.aclose()
    await admin.aclose()


# -- a black-holed connection -----------------------------------------------------------------


async def test_a_black_holed_connection_is_detected_and_recovered_with_no_job_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ensure(REDIS)
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    async with Proxy(REDIS.host, REDIS.port) as proxy:
        # The worker reaches Redis through the proxy; the producer directly.
        worker_url = f"redis://127.0.0.1:{proxy.port}/0?prefix={prefix}&socket_timeout=0.5"
        app, runs = counting_app(worker_url, visibility_timeout=30)
        producer = App(f"redis://{REDIS.host}:{REDIS.port}/0?prefix={prefix}")
        try:
            ids = await producer.enqueue_many(calls(JOBS))
            async with app.worker(concurrency=4, poll=1.0) as worker:
                await wait_until(check(lambda: len(runs.by_id) >= 4), within=10, what="a few runs")
                proxy.pause()
                # Detected within one call's deadline: the poll and 0.5 s for the reply.
                took = await wait_until(
                    check(lambda: bool(warnings_with(caplog, "no reply"))),
                    within=5,
                    what="the worker to notice the silence",
                )
                assert took < 1.0 + 0.5 + 1.0
                ids += await producer.enqueue_many(calls(JOBS))
                proxy.resume()
                await check_every_job_ran_once(producer, runs, ids)
                assert worker.state == "RUNNING"
            assert worker.counts == {"ok": 2 * JOBS}
        finally:
            await app.aclose()
            await producer.aclose()
            await delete_prefix(prefix)
