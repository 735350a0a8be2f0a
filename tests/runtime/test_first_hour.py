"""What a healthy worker says (a DEBUG line per job, an INFO summary per interval), a burst
run that leaves delayed jobs, and a stop that does not wait out a fetch backoff."""

from __future__ import annotations

import asyncio
import logging

import pytest

from aioworkers.testing import FakeClock

from .conftest import POLL, MakeApp, advance_until, run_burst, running


async def test_each_settled_job_is_one_debug_line(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = make_app()

    @app.task(retries=0)
    async def work(fail: bool) -> None:
        if fail:
            raise RuntimeError("no")

    ok_id = await work.enqueue(False)
    dead_id = await work.enqueue(True)
    with caplog.at_level(logging.DEBUG, logger="aioworkers"):
        await run_burst(app.worker(poll=POLL))
    lines = [r for r in caplog.records if r.levelno == logging.DEBUG and "job " in r.message]
    by_outcome = {r.job["outcome"]: r for r in lines}  # type: ignore[attr-defined]
    assert sorted(by_outcome) == ["dead", "ok"]
    assert f"id={ok_id}" in by_outcome["ok"].message
    assert f"id={dead_id}" in by_outcome["dead"].message
    assert "task=work" in by_outcome["ok"].message
    assert "duration=" in by_outcome["ok"].message


async def test_no_debug_lines_when_debug_is_off(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = make_app()

    @app.task
    async def work() -> None:
        pass

    await work.enqueue()
    with caplog.at_level(logging.INFO, logger="aioworkers"):
        await run_burst(app.worker(poll=POLL))
    assert not [r for r in caplog.records if r.levelno == logging.DEBUG]


async def test_an_info_summary_each_interval_and_none_while_idle(
    make_app: MakeApp, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = make_app(clock=clock)

    @app.task(retries=1, backoff=1000)
    async def work(fail: bool) -> None:
        if fail:
            raise RuntimeError("no")

    await app.enqueue_many([work.call(False) for _ in range(3)] + [work.call(True)])
    worker = app.worker(poll=POLL, clock=clock, summary_interval=10)
    with caplog.at_level(logging.INFO, logger="aioworkers"):
        async with running(worker, clock):
            await advance_until(clock, lambda: worker.counts.get("retried") == 1, step=0.01)
            await advance_until(clock, lambda: "jobs in the last" in caplog.text, step=1)
            summaries = [r.message for r in caplog.records if "jobs in the last" in r.message]
            assert summaries == [
                "jobs in the last 10s: done=3 failed=0 retried=1 rate=0.3/s in_flight=0"
            ]
            await clock.advance(30)  # nothing happens: nothing is said
            summaries = [r.message for r in caplog.records if "jobs in the last" in r.message]
            assert len(summaries) == 1


async def test_a_burst_run_can_leave_delayed_jobs_and_says_how_many(
    make_app: MakeApp, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = make_app(clock=clock)
    ran: list[int] = []

    @app.task
    async def work(n: int) -> None:
        ran.append(n)

    await work.enqueue(1)
    await work.options(delay=3600).enqueue(2)
    worker = app.worker(poll=POLL, clock=clock)
    run = asyncio.create_task(worker.run(burst=True, wait_delayed=False))
    with caplog.at_level(logging.INFO, logger="aioworkers"):
        took = await advance_until(clock, run.done, within=60)
        await run
    assert ran == [1]
    assert took < 60  # not the hour the delayed job waits
    assert "1 delayed job left for a later run" in caplog.text


async def test_stop_while_the_broker_is_down_does_not_wait_out_the_fetch_backoff(
    make_app: MakeApp, clock: FakeClock
) -> None:
    app, faulty = make_app(clock=clock)

    @app.task
    async def work() -> None:
        pass

    faulty.fail_while("fetch")
    worker = app.worker(poll=POLL, clock=clock)
    run = asyncio.create_task(worker.run())
    await worker.wait_started()
    # Several failures: the backoff pause has grown to seconds.
    await advance_until(clock, lambda: faulty.count("fetch", ok=False) >= 6, step=0.5)
    worker.stop()
    took = await advance_until(clock, run.done, step=0.01, what="the worker to stop")
    await run
    assert took < 0.1  # before: up to the pause left (the cap is 10 s)
