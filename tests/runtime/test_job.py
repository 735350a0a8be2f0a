"""`current_job()`: what a handler knows about the job it runs."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from aioworkers import AioworkersError, App, Job, current_job

from .conftest import POLL, run_burst


async def test_current_job_fields(app: App) -> None:
    jobs: list[Job] = []

    @app.task(retries=1, backoff=0)
    async def record(x: int) -> None:
        jobs.append(current_job())
        if current_job().attempt == 1:
            raise RuntimeError("once more")

    before = datetime.now(UTC)
    job_id = await record.options(key="welcome:42").enqueue(1)
    after = datetime.now(UTC)
    await run_burst(app.worker(poll=POLL))

    assert [j.attempt for j in jobs] == [1, 2]
    for job in jobs:
        assert job.id == job_id
        assert job.task == "record"
        assert job.queue == "default"
        assert job.key == "welcome:42"
        assert job.delivery_count == 1
        # enqueued_at is epoch ms on the wire: allow the truncation
        assert before - timedelta(milliseconds=1) <= job.enqueued_at <= after
        assert job.enqueued_at.tzinfo is not None
    # A retry is the same job, enqueued once.
    assert jobs[0].enqueued_at == jobs[1].enqueued_at


async def test_current_job_queue_and_no_key(app: App) -> None:
    jobs: list[Job] = []

    @app.task(queue="emails")
    async def send() -> None:
        jobs.append(current_job())

    job_id = await send.enqueue()
    other_id = await send.options(queue="urgent").enqueue()
    await run_burst(app.worker(queues=["emails", "urgent"], poll=POLL))

    by_id = {j.id: j for j in jobs}
    assert sorted(by_id) == sorted([job_id, other_id])
    assert by_id[job_id].queue == "emails"
    assert by_id[other_id].queue == "urgent"
    assert by_id[job_id].key is None


async def test_current_job_is_per_job(app: App) -> None:
    seen: dict[int, str] = {}
    both_started = asyncio.Event()
    started = 0

    @app.task
    async def overlap(n: int) -> None:
        nonlocal started
        started += 1
        if started == 2:
            both_started.set()
        await asyncio.wait_for(both_started.wait(), 2)
        seen[n] = current_job().id

    ids = await app.enqueue_many([overlap.call(0), overlap.call(1)])
    await run_burst(app.worker(concurrency=2, poll=POLL))

    assert [seen[0], seen[1]] == ids


async def test_current_job_raises_outside_a_job(app: App) -> None:
    with pytest.raises(AioworkersError, match="outside a job"):
        current_job()

    @app.task
    async def direct() -> Job:
        return current_job()

    # Calling a task directly is a plain coroutine call, not a job.
    with pytest.raises(AioworkersError):
        await direct()


async def test_current_job_does_not_leak_after_the_run(app: App) -> None:
    @app.task
    async def noop() -> None:
        current_job()

    await noop.enqueue()
    await run_burst(app.worker(poll=POLL))
    with pytest.raises(AioworkersError):
        current_job()
