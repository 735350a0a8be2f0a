"""The system clock's timeouts: a zero (or already past) timeout ends the wait at once.

Real time is under test here (SYSTEM_CLOCK), but nothing waits for it to pass: each wait
must end at once, and the bound of 2 s only turns a hang into a failure."""

from __future__ import annotations

import asyncio

import pytest

import aioworkers
from aioworkers._runtime.clock import SYSTEM_CLOCK, move_on_after


@pytest.mark.parametrize("seconds", [0.0, -1.0])
async def test_a_timeout_already_over_ends_the_wait_at_once(seconds: float) -> None:
    never = asyncio.Event()
    async with asyncio.timeout(2):
        with move_on_after(SYSTEM_CLOCK, seconds) as scope:
            await never.wait()
    assert scope.cancelled_caught


async def test_a_past_deadline_is_slept_as_now() -> None:
    async with asyncio.timeout(2):
        await SYSTEM_CLOCK.sleep(-0.5)


async def test_a_worker_with_no_grace_period_stops_and_releases_its_running_job() -> None:
    # grace=0 hung forever: the drain's zero timeout never fired.
    app = aioworkers.App("memory://")
    started = asyncio.Event()

    @app.task
    async def slow() -> None:
        started.set()
        await asyncio.Event().wait()

    await slow.enqueue()
    worker = app.worker(grace=0, poll=0.05)
    run = asyncio.create_task(worker.run())
    await started.wait()
    worker.stop()
    async with asyncio.timeout(2):
        await run
    assert worker.counts == {"released": 1}
    assert (await app.stats()).ready == 1
    await app.aclose()
