"""Strict queue priority on the memory broker: free slots are filled from the first queue
first, a later queue gets only what the earlier ones could not fill; "fair" is unchanged."""

from __future__ import annotations

import pytest

from aioworkers import App, ConfigError
from aioworkers._runtime.outcome import OutcomeName
from aioworkers.testing import FakeClock

from ..runtime.conftest import advance_until, running


def _tasks(app: App, order: list[str], clock: FakeClock) -> None:
    @app.task(name="work")
    async def work(queue: str) -> None:
        order.append(queue)
        await clock.sleep(0.5)


async def test_strict_drains_the_first_queue_before_the_next(app: App, clock: FakeClock) -> None:
    order: list[str] = []
    _tasks(app, order, clock)
    for queue in ("low", "default", "high") * 6:
        await app.enqueue("work", [queue], queue=queue)
    worker = app.worker(
        queues=["high", "default", "low"], priority="strict", concurrency=2, clock=clock
    )
    async with running(worker, clock):
        await advance_until(clock, lambda: len(order) == 18, within=60)
    assert order == ["high"] * 6 + ["default"] * 6 + ["low"] * 6


async def test_strict_gives_a_later_queue_what_the_first_cannot_fill(
    app: App, clock: FakeClock
) -> None:
    order: list[str] = []
    _tasks(app, order, clock)
    for queue in ("high", "high", "low", "low", "low"):
        await app.enqueue("work", [queue], queue=queue)
    worker = app.worker(queues=["high", "low"], priority="strict", concurrency=5, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: len(order) == 5)
        # All five started together: the two of high, and low filled the rest at once.
        assert worker.in_flight == 5
    assert order == ["high", "high", "low", "low", "low"]


async def test_strict_takes_new_high_work_before_waiting_low_work(
    app: App, clock: FakeClock
) -> None:
    order: list[str] = []
    _tasks(app, order, clock)
    for _ in range(4):
        await app.enqueue("work", ["low"], queue="low")
    worker = app.worker(queues=["high", "low"], priority="strict", concurrency=1, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: len(order) == 1)
        for _ in range(2):
            await app.enqueue("work", ["high"], queue="high")  # arrives under load
        await advance_until(clock, lambda: len(order) == 6, within=60)
    assert order == ["low", "high", "high", "low", "low", "low"]


async def test_strict_picks_up_work_on_any_queue_when_idle(app: App, clock: FakeClock) -> None:
    order: list[str] = []
    _tasks(app, order, clock)
    worker = app.worker(queues=["high", "default", "low"], priority="strict", poll=1.0, clock=clock)
    async with running(worker, clock):
        await clock.advance(5)
        await app.enqueue("work", ["low"], queue="low")
        took = await advance_until(clock, lambda: len(order) == 1, step=0.05)
        assert took <= 1.0 + 0.1  # about one poll, however many queues are asked first


def test_an_unknown_priority_is_a_config_error(app: App) -> None:
    with pytest.raises(ConfigError, match="priority"):
        app.worker(priority="loud")  # type: ignore[arg-type]


async def test_strict_never_starts_a_job_cancelled_while_queued(app: App, clock: FakeClock) -> None:
    # Strict priority fetches through its own path: the cancel marks of what it fetched
    # must be read before the jobs start, as the fair path does (a task without results
    # has no record to say it was cancelled).
    order: list[str] = []
    _tasks(app, order, clock)
    await app.enqueue("work", ["high"], queue="high")
    gone = await app.enqueue("work", ["low"], queue="low")
    assert await app.cancel(gone.id)
    worker = app.worker(queues=["high", "low"], priority="strict", concurrency=2, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: worker.counts.get(OutcomeName.CANCELLED) == 1)
        await advance_until(clock, lambda: order == ["high"])
        later = clock.time() + 1.0
        await advance_until(clock, lambda: clock.time() >= later)
    assert order == ["high"]
