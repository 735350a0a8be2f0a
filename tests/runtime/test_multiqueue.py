"""A worker on several queues: an empty queue's waiting fetch must not hold capacity."""

from __future__ import annotations

from aioworkers import App
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.testing import FakeClock

from .conftest import advance_until, running


async def test_busy_queue_uses_full_capacity_while_another_queue_is_empty(
    clock: FakeClock,
) -> None:
    app = App(MemoryBroker(clock=clock), queue="busy")
    busy = 0
    peak = 0
    done: list[int] = []

    @app.task
    async def work(i: int) -> None:
        nonlocal busy, peak
        busy += 1
        peak = max(peak, busy)
        await clock.sleep(0.05)
        busy -= 1
        done.append(i)

    await app.enqueue_many([work.call(i) for i in range(200)])
    # The idle queue's fetch blocks a full second each time: if it held the free slots
    # meanwhile, 200 jobs x 50 ms at concurrency 10 would take far longer than 1 s.
    worker = app.worker(concurrency=10, queues=["idle", "busy"], poll=1.0, clock=clock)
    async with running(worker, clock):
        took = await advance_until(clock, lambda: len(done) == 200, step=0.01, what="all jobs")
    assert sorted(done) == list(range(200))
    assert peak == 10
    assert took < 1.8, f"took {took:.2f}s: capacity was held by the idle queue's fetch"
