"""Burst mode and the concurrency limit: every job runs exactly once, never more at once
than the worker's capacity."""

from __future__ import annotations

import asyncio
from collections import Counter

from aioworkers import App, QueueDepth, current_job

from .conftest import POLL, FaultyBroker, MakeApp, run_burst


async def test_burst_runs_every_job_exactly_once(make_app: MakeApp) -> None:
    app, _ = make_app(visibility_timeout=10.0)
    runs: Counter[str] = Counter()
    values: dict[str, int] = {}

    @app.task
    async def work(n: int) -> None:
        await asyncio.sleep(0)
        job_id = current_job().id
        runs[job_id] += 1
        values[job_id] = n

    ids = await app.enqueue_many([work.call(n) for n in range(2000)])
    assert len(set(ids)) == 2000

    worker = app.worker(concurrency=200, poll=POLL)
    await run_burst(worker)

    assert set(runs) == set(ids)
    assert set(runs.values()) == {1}
    assert [values[i] for i in ids] == list(range(2000))
    assert worker.counts == {"ok": 2000}
    assert worker.state == "STOPPED"
    assert worker.in_flight == 0
    assert await app.stats() == QueueDepth(ready=0, in_flight=0, delayed=0, dead=0)


async def test_burst_on_an_empty_queue_returns_at_once(app: App) -> None:
    @app.task
    async def never() -> None:
        raise AssertionError("nothing was enqueued")

    async with asyncio.timeout(1.0):
        await app.worker(poll=POLL).run(burst=True)


async def test_burst_waits_for_retries_and_delayed_jobs(app: App) -> None:
    attempts: list[int] = []

    @app.task(retries=2, backoff=0.01)
    async def flaky() -> None:
        attempts.append(current_job().attempt)
        if current_job().attempt < 3:
            raise RuntimeError("not yet")

    await flaky.enqueue()
    await flaky.options(delay=0.1).enqueue()
    await run_burst(app.worker(poll=POLL))

    assert sorted(attempts) == [1, 1, 2, 2, 3, 3]
    assert await app.stats() == QueueDepth()


async def test_concurrency_limit_is_never_exceeded_and_is_reached(app: App) -> None:
    running = 0
    peak = 0
    done: Counter[str] = Counter()

    @app.task
    async def nap() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.02)
        finally:
            running -= 1
        done[current_job().id] += 1

    ids = await app.enqueue_many([nap.call() for _ in range(100)])
    await run_burst(app.worker(concurrency=10, poll=POLL))

    assert peak == 10
    assert running == 0
    assert sorted(done) == sorted(ids)
    assert set(done.values()) == {1}


async def test_fetch_asks_only_for_free_slots(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker

    @app.task
    async def nap() -> None:
        await asyncio.sleep(0.01)

    await app.enqueue_many([nap.call() for _ in range(30)])
    await run_burst(app.worker(concurrency=4, poll=POLL))

    asked = [c.kwargs["max_messages"] for c in faulty.calls_of("fetch")]
    got = [len(c.result) for c in faulty.calls_of("fetch")]
    assert max(asked) == 4
    assert all(1 <= n <= 4 for n in asked)
    assert sum(got) == 30
