"""On Redis with the state store on the broker's server (the default), the fetch reads the
cancel marks of what it hands out in the same script: a cancelled queued job still never
starts, and the store is asked for none of those marks. A body whose id the script cannot
read is screened by the store, as on every other broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Collection

import pytest

from aioworkers import App, current_job
from aioworkers.envelope import Envelope, encode, new_id, now_ms
from aioworkers.store.redis import RedisStore

from ..runtime.conftest import wait_until
from ..services import REDIS, REDIS_URL, delete_prefix, ensure


@pytest.fixture
async def app() -> AsyncIterator[App]:
    ensure(REDIS)
    prefix = f"test-redis-screen-{uuid.uuid4().hex[:8]}"
    app = App(f"{REDIS_URL}?prefix={prefix}")
    try:
        yield app
    finally:
        await app.aclose()
        await delete_prefix(prefix)


def spy_on_marks(store: object, asked: list[str]) -> None:
    """Record the ids the runtime asks the store about (`Store.cancelled`)."""
    assert isinstance(store, RedisStore)
    read = store.cancelled

    async def cancelled(job_ids: Collection[str]) -> set[str]:
        asked.extend(job_ids)
        return await read(job_ids)

    store.cancelled = cancelled  # type: ignore[method-assign]


async def test_cancelled_queued_jobs_never_start_and_the_store_is_not_asked(app: App) -> None:
    ran: list[int] = []

    @app.task
    async def work(n: int) -> None:
        ran.append(n)

    jobs = await app.enqueue_many([work.call(n) for n in range(20)])
    cancelled = {n for n in range(20) if n % 3 == 0}
    for n in cancelled:
        assert await jobs[n].cancel() is True
    asked: list[str] = []
    spy_on_marks(app.store, asked)
    async with app.worker(concurrency=5) as worker:
        await wait_until(
            lambda: sum(worker.counts.values()) == 20, within=10, what="every job settled"
        )
    assert sorted(ran) == sorted(set(range(20)) - cancelled)
    assert {k: v for k, v in worker.counts.items() if v} == {"ok": 13, "cancelled": 7}
    assert asked == []  # read by the broker's fetch, in the same step


async def test_a_body_the_fetch_cannot_read_is_screened_by_the_store(app: App) -> None:
    ran: list[str] = []

    @app.task
    async def work() -> None:
        ran.append("ran")

    odd = "not one of ours"  # a space: outside the id pattern a script reads
    envs = [
        Envelope(odd, "work", [], {}, enqueued_at=now_ms()),
        Envelope(new_id(), "work", [], {}, enqueued_at=now_ms()),
    ]
    assert app.store is not None
    await app.store.mark_cancelled(odd, ttl=60)
    await app.broker.publish(app.queue, [encode(env) for env in envs])
    asked: list[str] = []
    spy_on_marks(app.store, asked)
    async with app.worker(concurrency=5) as worker:
        await wait_until(
            lambda: sum(worker.counts.values()) == 2, within=10, what="both jobs settled"
        )
    assert ran == ["ran"]
    assert worker.counts["cancelled"] == 1
    assert asked == [odd]


async def test_jobs_an_idle_worker_waited_for_are_screened_without_asking_the_store(
    app: App,
) -> None:
    # The worker's fetch blocks on an empty queue when they arrive: the marks are read
    # behind that blocking read, not in a round trip of their own before the jobs start.
    ran: list[str] = []

    @app.task
    async def work() -> None:
        ran.append(current_job().id)

    envs = [Envelope(new_id(), "work", [], {}, enqueued_at=now_ms()) for _ in range(3)]
    assert app.store is not None
    asked: list[str] = []
    spy_on_marks(app.store, asked)
    async with app.worker(concurrency=5, poll=5.0) as worker:
        await asyncio.sleep(0.3)  # nothing ready: the fetch blocks
        await app.store.mark_cancelled(envs[0].id, ttl=60)
        await app.broker.publish(app.queue, [encode(env) for env in envs])
        await wait_until(
            lambda: sum(worker.counts.values()) == 3, within=4, what="every job settled"
        )
    assert sorted(ran) == sorted(env.id for env in envs[1:])
    assert {k: v for k, v in worker.counts.items() if v} == {"ok": 2, "cancelled": 1}
    assert asked == []
