"""The worker's side of the limits, in one process on the memory broker, and their flags."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

import aioworkers
from aioworkers import supervisor


async def test_job_timeout_bounds_tasks_registered_without_one() -> None:
    app = aioworkers.App("memory://")

    @app.task(retries=0)
    async def stuck() -> None:
        await asyncio.sleep(30)

    @app.task(retries=0, timeout=5)
    async def patient() -> None:
        await asyncio.sleep(0.5)  # its own timeout wins over the default

    await stuck.enqueue()
    await patient.enqueue()
    worker = app.worker(job_timeout=0.2)
    await asyncio.wait_for(worker.run(burst=True), 10)
    assert worker.counts["ok"] == 1
    assert worker.counts["dead"] == 1
    (dead,) = await app.dlq().list()
    assert dead.task == "stuck"
    assert dead.error is not None
    assert "timed out after 0.2s" in dead.error


async def test_max_jobs_recycles_after_that_many_and_hands_back_the_rest() -> None:
    app = aioworkers.App("memory://")
    done: list[int] = []

    @app.task
    async def job(i: int) -> None:
        await asyncio.sleep(0.01)
        done.append(i)

    await app.enqueue_many([job.call(i) for i in range(10)])
    worker = app.worker(concurrency=2, max_jobs=3)
    await asyncio.wait_for(worker.run(), 10)  # returns by itself: recycled
    assert worker.recycled == "ran max_jobs=3 jobs"
    assert worker.jobs_started == 3
    assert worker.counts["ok"] == 3
    assert len(done) == 3
    depth = await app.stats()
    assert (depth.ready, depth.in_flight) == (7, 0)


async def test_recycle_after_stop_is_ignored() -> None:
    app = aioworkers.App("memory://")
    worker = app.worker()
    async with worker:
        worker.stop()
        worker.recycle("too late")
    assert worker.recycled is None


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--processes", "-1", "--processes: expected 0 (one per CPU) or more processes"),
        ("--max-jobs-per-child", "0", "--max-jobs-per-child: must be >= 1"),
        ("--max-memory-per-child", "lots", "--max-memory-per-child: expected megabytes"),
        ("--max-job-seconds", "0", "--max-job-seconds: must be > 0"),
    ],
)
def test_bad_limit_flags_fail_with_one_line(flag: str, value: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aioworkers", "run", "x:app", flag, value],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"aioworkers: error: argument {message}"), line


@pytest.mark.parametrize(
    ("ready", "lived", "rc", "crashes_before", "delay"),
    [
        (True, 1.0, -9, 0, 0.5),  # killed while running: replaced soon
        (True, 1.0, 1, 3, 4.0),  # a crash loop backs off ...
        (True, 1.0, 1, 9, supervisor.MAX_BACKOFF),  # ... up to a cap
        (True, 60.0, 1, 9, 0.5),  # a child that ran a while starts afresh
        (True, 1.0, supervisor.RECYCLE_EXIT, 3, 0.0),  # recycled: at once
        (True, 1.0, 0, 0, None),  # --burst: done
        (False, 0.1, -9, 0, 0.5),  # killed from outside before it was up: not its fault
        (False, 0.1, 1, 0, 0.5),  # failed at start: tried again ...
        (False, 0.1, 2, 0, None),  # ... unless it is a usage error
    ],
)
def test_what_the_supervisor_does_when_a_child_exits(
    ready: bool, lived: float, rc: int, crashes_before: int, delay: float | None
) -> None:
    sup = supervisor.Supervisor(["run", "x:app"], 2, grace=None)
    slot = sup.slots[0]
    slot.ready, slot.crashes = ready, crashes_before
    assert sup._after_exit(slot, rc, lived) == delay
    assert (sup._gave_up is not None) == (rc == supervisor.USAGE_EXIT)


def test_the_supervisor_gives_up_after_children_keep_failing_at_start() -> None:
    sup = supervisor.Supervisor(["run", "x:app"], 3, grace=None)
    delays = [sup._after_exit(slot, 1, 0.1) for slot in sup.slots]
    assert delays == [0.5, 0.5, None]
    assert sup._gave_up == 1
