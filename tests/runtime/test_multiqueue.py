"""A worker on several queues: an empty queue's waiting fetch must not hold capacity."""

from __future__ import annotations

import asyncio
import time

from aioworkers import App
from aioworkers.brokers.memory import MemoryBroker

from .conftest import wait_until


async def test_busy_queue_uses_full_capacity_while_another_queue_is_empty() -> None:
    app = App(MemoryBroker(), queue="busy")
    running = 0
    peak = 0
    done: list[int] = []

    @app.task
    async def work(i: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        done.append(i)

    await app.enqueue_many([work.call(i) for i in range(200)])
    # The idle queue's fetch blocks a full second each time: if it held the free slots
    # meanwhile, 200 jobs x 50 ms at concurrency 10 would take far longer than 1 s.
    worker = app.worker(concurrency=10, queues=["idle", "busy"], poll=1.0)
    started = time.monotonic()
    async with worker:
        await wait_until(lambda: len(done) == 200, within=10, what="all jobs")
        elapsed = time.monotonic() - started
    assert sorted(done) == list(range(200))
    assert peak == 10
    assert elapsed < 1.8, f"took {elapsed:.2f}s: capacity was held by the idle queue's fetch"
