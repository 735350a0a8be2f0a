"""The worker registry (aioworkers._registry) on each store: a beat is listed, a record
that is not beaten again lapses after its TTL, a stopped worker forgets itself; and the
dashboard's Workers page of an app on PostgreSQL lists its running worker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aioworkers._registry import WorkerInfo, keep_registered, registry_for
from aioworkers.store import MemoryStore, Store
from aioworkers.testing import FakeClock

from ..services import REDIS, REDIS_URL, ensure, postgres_database


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "sqlite":
        from aioworkers.store.sqlite import SqliteStore

        sqlite = SqliteStore(f"sqlite:///{tmp_path}/state.db")
        yield sqlite
        await sqlite.aclose()
        return
    if request.param == "postgres":
        pytest.importorskip("asyncpg")
        from aioworkers.store.postgres import PostgresStore

        async with postgres_database("aw_registry") as url:
            postgres = PostgresStore(url)
            await postgres.migrate()
            yield postgres
            await postgres.aclose()
        return
    ensure(REDIS)
    from aioworkers.store.redis import RedisStore

    prefix = f"test-registry-{uuid.uuid4().hex[:8]}"
    redis = RedisStore(f"{REDIS_URL}?prefix={prefix}")
    try:
        yield redis
    finally:
        for registry in [registry_for(redis)]:
            assert registry is not None
            for info in await registry.workers():
                await registry.forget(info.id)
        await redis.aclose()


def info(worker_id: str, started: float = 1.0) -> WorkerInfo:
    return WorkerInfo(worker_id, "h", 1, ("q",), 10, 2, 5, 4, 1, started, started + 1, "RUNNING")


async def test_beats_are_listed_and_lapse(store: Store) -> None:
    registry = registry_for(store)
    assert registry is not None
    await registry.beat(info("a", started=2.0), ttl=30)
    await registry.beat(info("b", started=1.0), ttl=0.2)
    assert [w.id for w in await registry.workers()] == ["b", "a"]  # oldest first
    assert (await registry.workers())[1] == info("a", started=2.0)
    # A real TTL under test: the store's own clock (Redis's on Redis) lapses the record.
    await asyncio.sleep(0.3)
    assert [w.id for w in await registry.workers()] == ["a"]
    await registry.forget("a")
    assert await registry.workers() == []


class Reporter:
    queues = ["q"]  # noqa: RUF012
    concurrency = 3
    state = "RUNNING"
    in_flight = 1
    jobs_started = 9
    counts = {"ok": 7, "dead": 1}  # noqa: RUF012


async def test_a_worker_keeps_itself_registered_and_forgets_itself(store: Store) -> None:
    clock = FakeClock()
    registry = registry_for(store)
    assert registry is not None
    task = asyncio.create_task(keep_registered(Reporter(), lambda: store, clock, every=5.0))
    for _ in range(100):
        found = await registry.workers()
        if found:
            break
        await asyncio.sleep(0.01)
    assert [(w.in_flight, w.jobs_ok, w.jobs_failed, w.queues) for w in found] == [(1, 7, 1, ("q",))]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await registry.workers() == []


async def test_no_store_no_registry() -> None:
    def missing() -> Store:
        from aioworkers.errors import ConfigError

        raise ConfigError("no store on amqp://")

    await keep_registered(Reporter(), missing, FakeClock())  # returns at once, quietly
    assert registry_for(None) is None


async def test_the_workers_page_of_a_postgres_app_lists_its_running_worker() -> None:
    pytest.importorskip("asyncpg")
    from aioworkers import App

    from .conftest import board, client

    async with postgres_database("aw_web") as url:
        app = App(url)  # the broker's database is the store too

        @app.task()
        async def noop() -> None: ...

        await app.migrate()
        try:
            async with client(board(app)) as c:
                async with app.worker(concurrency=6, queues=["default"]):
                    for _ in range(300):  # its first beat is written as it starts
                        page = (await c.get("/workers")).text
                        if 'class="worker"' in page:
                            break
                        await asyncio.sleep(0.01)
                gone = (await c.get("/workers")).text
        finally:
            await app.aclose()
    assert page.count('class="worker"') == 1
    assert "<td>6</td>" in page  # its concurrency
    assert "keeps no worker registry" not in page
    assert 'class="worker"' not in gone  # forgotten as it stopped
