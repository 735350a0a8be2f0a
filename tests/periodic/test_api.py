"""`@app.periodic`: registration, the schedule's job fields, and an embedded worker that
fires a schedule."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from aioworkers import App, ConfigError, Job, current_job
from aioworkers.periodic import SCHEDULE_HEADER, SLOT_HEADER


def test_periodic_registers_a_task_and_a_schedule() -> None:
    app = App("memory://")

    @app.periodic(every=30, args=["eu"], overlap="skip", catchup=600, retries=7)
    async def sync_region(region: str) -> None: ...

    assert app.tasks["sync_region"] is sync_region
    assert sync_region.policy.retries == 7
    schedule = app.schedules["sync_region"]
    assert (schedule.every, schedule.args, schedule.overlap, schedule.catchup) == (
        30,
        ("eu",),
        "skip",
        600.0,
    )


def test_periodic_schedules_an_existing_task_under_its_own_name() -> None:
    app = App("memory://")

    @app.task
    async def report(kind: str) -> None: ...

    same = app.periodic(cron="0 7 * * 1-5", tz="Europe/Paris", name="weekday", args=["d"])(report)
    assert same is report
    assert app.schedules["weekday"].task == "report"
    app.periodic(cron="*/10 * * * * *", kwargs={"kind": "s"}, name="seconds")(report)
    assert app.schedules["seconds"].cron == "*/10 * * * * *"


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"cron": "* * * * *", "every": 5},
        {"every": 0},
        {"every": -1},
        {"cron": "* * *"},
        {"cron": "61 * * * *"},
        {"cron": "0 0 30 2 *"},
        {"every": 5, "tz": "Mars/Olympus"},
        {"every": 5, "overlap": "queue"},
        {"every": 5, "catchup": -1},
    ],
)
def test_bad_schedules_are_config_errors(options: dict[str, object]) -> None:
    app = App("memory://")
    with pytest.raises(ConfigError):

        @app.periodic(**options)  # type: ignore[arg-type]
        async def job() -> None: ...


def test_arguments_are_checked_and_names_are_unique() -> None:
    app = App("memory://")

    @app.task
    async def one(x: int) -> None: ...

    with pytest.raises(TypeError):
        app.periodic(every=5)(one)
    app.periodic(every=5, args=[1])(one)
    with pytest.raises(ConfigError, match="already registered"):
        app.periodic(every=9, args=[1])(one)


def test_job_carries_its_schedule_and_slot() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    headers = {SCHEDULE_HEADER: "nightly", SLOT_HEADER: str(int(when.timestamp() * 1000))}
    job = Job("i", "t", 1, "q", None, when, headers=headers)
    assert (job.schedule, job.scheduled_for) == ("nightly", when)
    assert job.scheduled_for is not None
    assert job.scheduled_for.tzinfo is not None
    plain = Job("i", "t", 1, "q", None, when)
    assert (plain.schedule, plain.scheduled_for) == (None, None)
    assert Job("i", "t", 1, "q", None, when, headers={SLOT_HEADER: "x"}).scheduled_for is None


def test_no_schedule_no_scheduler() -> None:
    app = App("memory://")

    @app.task
    async def plain() -> None: ...

    assert app.worker().periodic is None
    app.periodic(every=1)(plain)
    assert app.worker().periodic is not None
    assert app.worker(scheduler=False).periodic is None


async def test_an_embedded_worker_fires_and_skips_overlapping_runs() -> None:
    # Real time: the scheduler, the fetch loop and a handler that outlives its interval
    # meet end to end here (the loop alone is tested on a fake clock in test_loop.py).
    app = App("memory://")
    slots: list[datetime | None] = []
    running = asyncio.Event()
    finish = asyncio.Event()
    second = asyncio.Event()

    @app.periodic(every=0.2, overlap="skip")
    async def slow() -> None:
        job = current_job()
        assert job.schedule == "slow"
        slots.append(job.scheduled_for)
        if len(slots) == 2:
            second.set()
        running.set()
        await finish.wait()

    worker = app.worker(poll=0.05)
    async with worker:
        await asyncio.wait_for(running.wait(), 5)
        await asyncio.sleep(0.7)  # three or so slots pass while the run goes on
        assert len(slots) == 1
        finish.set()
        await asyncio.wait_for(second.wait(), 5)
    assert worker.periodic is not None
    counts = worker.periodic.counts  # type: ignore[attr-defined]
    assert counts[("slow", "skipped")] >= 2
    assert all(s is not None and s.microsecond % 200_000 == 0 for s in slots)
