"""Shutdown always ends: a second `stop()` ends it within a bounded time however the
handlers and the broker behave; jobs that could not be handed back are left to their
lease (and said so), never lost.

The bounds of the shutdown path are the thing under test: they are asserted exactly on a
fake clock that the worker and the broker share (the shutdown waits run on the worker's
clock), and once in real time end to end through the command line (the last test)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from aioworkers import App, QueueDepth
from aioworkers._runtime.shutdown import ABANDON_WAIT, SETTLE_GRACE, STOP_NOW_GRACE
from aioworkers.testing import FakeClock

from .conftest import POLL, FaultyBroker, MakeApp, advance_until, wait_until


def left_to_lease(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if "lease" in r.getMessage() and r.levelno >= logging.WARNING
    ]


async def redelivered(faulty: FaultyBroker, clock: FakeClock) -> int:
    """Wait for the job's lease to lapse; return the delivery count it comes back with."""
    fetch = asyncio.create_task(faulty.inner.fetch("default", max_messages=10, wait=3, lease=1))
    await advance_until(clock, fetch.done, what="the lease to lapse")
    (again,) = fetch.result()
    await faulty.inner.ack([again])
    return again.count


class Stubborn:
    """A handler that swallows every cancellation until ``let_go``, then gives up."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.started = asyncio.Event()
        self.cancels = 0
        self.let_go = False
        self.task: asyncio.Task[object] | None = None

    async def __call__(self) -> None:
        self.task = asyncio.current_task()
        self.started.set()
        while True:
            try:
                await self.clock.sleep(30)
            except asyncio.CancelledError:
                self.cancels += 1
                if self.let_go:
                    raise

    async def end(self) -> None:
        self.let_go = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=2)


async def stop_twice(
    worker_run: asyncio.Task[None], stop: Callable[[], None], clock: FakeClock
) -> float:
    """Stop, let the clock run a while (the first stop waits on the grace period), stop
    again; returns the clock's seconds from the second stop until `run()` returned."""
    stop()
    await clock.advance(1.0)
    assert not worker_run.done()
    stop()
    return await advance_until(clock, worker_run.done, what="run() to return")


async def test_second_stop_ends_a_handler_that_ignores_cancellation(
    make_app: MakeApp, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    app, faulty = make_app(visibility_timeout=0.5, clock=clock)
    stubborn = Stubborn(clock)
    app.task(name="stubborn")(stubborn.__call__)
    await app.enqueue("stubborn")
    worker = app.worker(grace=30, poll=POLL, clock=clock)
    run = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(stubborn.started.wait(), 5)
        took = await stop_twice(run, worker.stop, clock)
        # The runs get a second to hand their jobs back, then a second after the next cancel.
        assert took <= STOP_NOW_GRACE + ABANDON_WAIT + POLL
        await run
        assert stubborn.cancels >= 2
        assert worker.in_flight == 0
        assert "released" not in worker.counts
        assert any("left 1 jobs to their leases" in m for m in left_to_lease(caplog))
        # Not lost: the broker hands it out again once its lease lapses.
        assert await redelivered(faulty, clock) == 2
    finally:
        await stubborn.end()


async def test_second_stop_ends_a_release_against_a_broker_that_is_down(
    make_app: MakeApp, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    app, faulty = make_app(visibility_timeout=0.5, clock=clock)
    started = asyncio.Event()

    @app.task
    async def long() -> None:
        started.set()
        await clock.sleep(30)

    await long.enqueue()
    faulty.fail_while("release")
    worker = app.worker(grace=30, poll=POLL, clock=clock)
    run = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 5)
    took = await stop_twice(run, worker.stop, clock)
    # Not the SETTLE_GRACE the first stop's hand-back may take: a second stop means now.
    assert took <= STOP_NOW_GRACE + ABANDON_WAIT + POLL
    await run
    assert faulty.count("release", ok=False) >= 1
    assert "released" not in worker.counts
    assert any("left 1 jobs to their leases" in m for m in left_to_lease(caplog))
    faulty.heal("release")
    assert await redelivered(faulty, clock) == 2


async def test_a_handler_still_unwinding_its_first_cancel_gets_the_second(
    make_app: MakeApp, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    app, faulty = make_app(visibility_timeout=0.5, clock=clock)
    started = asyncio.Event()
    cleanups: list[str] = []

    @app.task
    async def slow_cleanup() -> None:
        started.set()
        try:
            await clock.sleep(30)
        except asyncio.CancelledError:
            cleanups.append("begun")
            await clock.sleep(30)  # a long cleanup: the second cancel lands here
            cleanups.append("finished")
            raise

    await slow_cleanup.enqueue()
    faulty.fail_while("release")
    worker = app.worker(grace=30, poll=POLL, clock=clock)
    run = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 5)
    # Fails (the clock runs out) if the second cancel was swallowed: the release would
    # retry forever.
    await stop_twice(run, worker.stop, clock)
    await run
    assert cleanups == ["begun"]
    assert "released" not in worker.counts
    faulty.heal("release")
    assert await redelivered(faulty, clock) == 2


async def test_one_stop_is_bounded_too(
    make_app: MakeApp, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    app, faulty = make_app(visibility_timeout=0.5, clock=clock)
    stubborn = Stubborn(clock)
    app.task(name="stubborn")(stubborn.__call__)
    await app.enqueue("stubborn")
    worker = app.worker(grace=0.2, poll=POLL, clock=clock)
    run = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(stubborn.started.wait(), 5)
        worker.stop()
        took = await advance_until(clock, run.done, what="run() to return")
        # The fetch under way returns (a poll), the grace period, the hand-back window,
        # the wait after the second cancel: then the job is left to its lease.
        assert took <= POLL + 0.2 + SETTLE_GRACE + ABANDON_WAIT + POLL
        await run
        assert any("left 1 jobs to their leases" in m for m in left_to_lease(caplog))
        assert await redelivered(faulty, clock) == 2
    finally:
        await stubborn.end()


async def test_second_stop_while_fetch_hangs_returns(make_app: MakeApp, clock: FakeClock) -> None:
    app, faulty = make_app(clock=clock)

    @app.task
    async def job() -> None:
        pass

    # A fetch whose reply never comes (a black-holed connection): the first stop waits
    # for it, the second does not.
    faulty.hold("fetch")
    worker = app.worker(poll=POLL, clock=clock)
    run = asyncio.create_task(worker.run())
    await wait_until(lambda: faulty.count("fetch") >= 1, what="the fetch")
    await stop_twice(run, worker.stop, clock)
    await run
    assert await app.stats() == QueueDepth()


CLI_APP = """
import asyncio
import sys

import aioworkers

app = aioworkers.App({url!r}, visibility_timeout=1.0)


@app.task
async def stubborn() -> None:
    print("started", flush=True)
    while True:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            print("cancel ignored", flush=True)
"""


def test_cli_second_signal_exits_despite_a_handler_that_ignores_cancellation(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/jobs.db"
    (tmp_path / "stubbornapp.py").write_text(textwrap.dedent(CLI_APP.format(url=url)))
    env = {k: v for k, v in os.environ.items() if k != "AIOWORKERS_BROKER_URL"}
    env["PYTHONPATH"] = str(tmp_path)

    async def enqueue() -> None:
        async with App(url) as app:
            await app.enqueue("stubborn")

    asyncio.run(enqueue())
    proc = subprocess.Popen(
        [sys.executable, "-m", "aioworkers", "run", "stubbornapp:app", "--grace", "30"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    # Real time on purpose: the process's exit, with the system clock, end to end.
    assert time.monotonic() - t0 < 8
    assert proc.returncode == 0, err
    assert "left 1 jobs to their leases" in err
    assert "cancel ignored" in out
