"""Shutdown always ends: a second `stop()` ends it within a bounded time however the
handlers and the broker behave; jobs that could not be handed back are left to their
lease (and said so), never lost.

These tests measure real time on purpose: the bounds of the shutdown path are the thing
under test. Each bound asserted is a few times the worker's own constants."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aioworkers import App, QueueDepth

from .conftest import POLL, FaultyBroker, MakeApp, wait_until


def left_to_lease(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if "lease" in r.getMessage() and r.levelno >= logging.WARNING
    ]


async def redelivered(faulty: FaultyBroker, *, within: float) -> int:
    """Wait for the job's lease to lapse; return the delivery count it comes back with."""
    (again,) = await faulty.inner.fetch("default", max_messages=10, wait=within)
    await faulty.inner.ack([again])
    return again.count


class Stubborn:
    """A handler that swallows every cancellation until ``let_go``, then gives up."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancels = 0
        self.let_go = False
        self.task: asyncio.Task[object] | None = None

    async def __call__(self) -> None:
        self.task = asyncio.current_task()
        self.started.set()
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancels += 1
                if self.let_go:
                    raise

    async def end(self) -> None:
        self.let_go = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=2)


async def test_second_stop_ends_a_handler_that_ignores_cancellation(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app, faulty = make_app(visibility_timeout=0.5)
    stubborn = Stubborn()
    app.task(name="stubborn")(stubborn.__call__)
    await app.enqueue("stubborn")
    worker = app.worker(grace=30, poll=POLL)
    run = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(stubborn.started.wait(), 5)
        worker.stop()
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        worker.stop()
        await asyncio.wait({run}, timeout=6)
        assert run.done(), "run() still waits for a handler that ignores cancellation"
        assert time.monotonic() - t0 < 4
        await run
        assert stubborn.cancels >= 2
        assert worker.in_flight == 0
        assert "released" not in worker.counts
        assert any("left 1 jobs to their leases" in m for m in left_to_lease(caplog))
        # Not lost: the broker hands it out again once its lease lapses.
        assert await redelivered(faulty, within=3) == 2
    finally:
        await stubborn.end()


async def test_second_stop_ends_a_release_against_a_broker_that_is_down(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app, faulty = make_app(visibility_timeout=0.5)
    started = asyncio.Event()

    @app.task
    async def long() -> None:
        started.set()
        await asyncio.sleep(30)

    await long.enqueue()
    faulty.fail_while("release")
    worker = app.worker(grace=30, poll=POLL)
    run = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 5)
    worker.stop()
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    worker.stop()
    await asyncio.wait({run}, timeout=8)
    assert run.done()
    # Not the 5 s the first stop's hand-back may take: a second stop means now.
    assert time.monotonic() - t0 < 3
    await run
    assert faulty.count("release", ok=False) >= 1
    assert "released" not in worker.counts
    assert any("left 1 jobs to their leases" in m for m in left_to_lease(caplog))
    faulty.heal("release")
    assert await redelivered(faulty, within=3) == 2


async def test_a_handler_still_unwinding_its_first_cancel_gets_the_second(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app, faulty = make_app(visibility_timeout=0.5)
    started = asyncio.Event()
    cleanups: list[str] = []

    @app.task
    async def slow_cleanup() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cleanups.append("begun")
            await asyncio.sleep(30)  # a long cleanup: the second cancel lands here
            cleanups.append("finished")
            raise

    await slow_cleanup.enqueue()
    faulty.fail_while("release")
    worker = app.worker(grace=30, poll=POLL)
    run = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 5)
    worker.stop()
    await asyncio.sleep(0.1)
    worker.stop()
    await asyncio.wait({run}, timeout=8)
    assert run.done(), "the second cancel was swallowed: the release retries forever"
    await run
    assert cleanups == ["begun"]
    assert "released" not in worker.counts
    faulty.heal("release")
    assert await redelivered(faulty, within=3) == 2


async def test_one_stop_is_bounded_too(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Short hand-back window, so the test is quick; the bound is what matters.
    monkeypatch.setattr("aioworkers._runtime.shutdown.SETTLE_GRACE", 0.3)
    app, faulty = make_app(visibility_timeout=0.5)
    stubborn = Stubborn()
    app.task(name="stubborn")(stubborn.__call__)
    await app.enqueue("stubborn")
    worker = app.worker(grace=0.2, poll=POLL)
    run = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(stubborn.started.wait(), 5)
        worker.stop()
        await asyncio.wait({run}, timeout=6)
        assert run.done(), "one stop waits forever for a handler that ignores cancellation"
        await run
        assert any("left 1 jobs to their leases" in m for m in left_to_lease(caplog))
        assert await redelivered(faulty, within=3) == 2
    finally:
        await stubborn.end()


async def test_second_stop_while_fetch_hangs_returns(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker

    @app.task
    async def job() -> None:
        pass

    # A fetch whose reply never comes (a black-holed connection): the first stop waits
    # for it, the second does not.
    faulty.hold("fetch")
    worker = app.worker(poll=POLL)
    run = asyncio.create_task(worker.run())
    await wait_until(lambda: faulty.count("fetch") >= 1, what="the fetch")
    worker.stop()
    await asyncio.sleep(0.2)
    assert not run.done()
    worker.stop()
    await asyncio.wait_for(run, 3)
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
    assert time.monotonic() - t0 < 8
    assert proc.returncode == 0, err
    assert "left 1 jobs to their leases" in err
    assert "cancel ignored" in out
