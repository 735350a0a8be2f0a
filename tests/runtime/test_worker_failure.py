"""An error no broker should let out (not `BrokerUnavailable`) from fetch, or from a
service task (lease loop, acker), stops the worker the same way a `stop()` does: logged at
once, jobs running finish and are settled within the grace period, nothing is left
waiting, and `run()` raises the error."""

from __future__ import annotations

import asyncio
import logging

import pytest

from aioworkers import App, QueueDepth
from aioworkers.testing import FakeClock

from .conftest import POLL, FaultyBroker, MakeApp, advance_until, wait_until


def failure_logged(caplog: pytest.LogCaptureFixture, error: type[BaseException]) -> bool:
    return any(
        r.levelno >= logging.ERROR and r.exc_info is not None and r.exc_info[0] is error
        for r in caplog.records
    )


async def test_an_unexpected_fetch_error_drains_settles_and_is_raised(
    app_and_broker: tuple[App, FaultyBroker], caplog: pytest.LogCaptureFixture
) -> None:
    app, faulty = app_and_broker
    gate = asyncio.Event()
    started: list[int] = []

    @app.task
    async def job() -> None:
        started.append(1)
        await gate.wait()

    await job.enqueue()
    worker = app.worker(grace=10, poll=POLL)
    run = asyncio.create_task(worker.run())
    await wait_until(lambda: started == [1], what="the job to start")
    faulty.raise_next("fetch", RuntimeError("unexpected reply"))
    await wait_until(lambda: failure_logged(caplog, RuntimeError), what="the error logged")
    assert worker.state == "QUIET"  # fetches no more, but the job goes on
    assert not run.done()

    # The job finishes after the failure: its ack still goes out.
    gate.set()
    with pytest.raises(RuntimeError, match="unexpected reply"):
        await asyncio.wait_for(run, 5)
    assert worker.counts == {"ok": 1}
    assert len(faulty.settled("ack")) == 1
    assert worker.in_flight == 0
    assert await app.stats() == QueueDepth()


async def test_a_job_waiting_for_its_ack_when_fetch_fails_is_acked(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker
    done: list[int] = []

    @app.task
    async def job() -> None:
        done.append(1)

    faulty.fail_while("ack")
    await job.enqueue()
    worker = app.worker(grace=10, poll=POLL)
    run = asyncio.create_task(worker.run())
    await wait_until(lambda: faulty.count("ack", ok=False) >= 1, what="the ack backing off")
    faulty.raise_next("fetch", ValueError("bad frame"))
    await wait_until(lambda: faulty.count("fetch", ok=False) == 1, what="the failed fetch")
    await asyncio.sleep(0.1)
    assert not run.done()  # still waiting for the ack
    faulty.heal("ack")
    with pytest.raises(ValueError, match="bad frame"):
        await asyncio.wait_for(run, 5)
    assert done == [1]
    assert worker.counts == {"ok": 1}
    assert await app.stats() == QueueDepth()


async def test_unstarted_deliveries_are_released_when_fetch_fails(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker
    gate = asyncio.Event()
    started: list[int] = []

    @app.task
    async def job(n: int) -> None:
        started.append(n)
        await gate.wait()

    await app.enqueue_many([job.call(n) for n in range(3)])
    worker = app.worker(concurrency=1, grace=10, poll=POLL)
    run = asyncio.create_task(worker.run())
    await wait_until(lambda: len(started) == 1, what="one job to start")
    faulty.raise_next("fetch", RuntimeError("boom"))
    gate.set()
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(run, 5)
    assert worker.counts["ok"] >= 1
    assert sum(worker.counts.values()) == worker.counts["ok"]
    # The rest is ready for another worker, not held until a lease lapses.
    assert await app.stats() == QueueDepth(ready=3 - worker.counts["ok"])


async def test_an_embedded_worker_logs_its_failure_when_it_happens(
    app_and_broker: tuple[App, FaultyBroker], caplog: pytest.LogCaptureFixture
) -> None:
    app, faulty = app_and_broker

    @app.task
    async def job() -> None:
        pass

    worker = app.worker(poll=POLL)

    async def service() -> None:
        async with worker:
            faulty.raise_next("fetch", RuntimeError("unmapped"))
            # Logged while the service embedding the worker still runs, not at its exit.
            await wait_until(lambda: failure_logged(caplog, RuntimeError), what="the log")
            await wait_until(lambda: worker.state == "STOPPED", what="the worker to stop")

    with pytest.raises(RuntimeError, match="unmapped"):
        await service()
    (record,) = [r for r in caplog.records if r.exc_info and r.exc_info[0] is RuntimeError]
    assert "fetch" in record.getMessage()


async def test_a_failing_lease_loop_stops_the_worker_after_the_drain(
    make_app: MakeApp, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    app, faulty = make_app(visibility_timeout=0.3, clock=clock)
    gate = asyncio.Event()
    started: list[int] = []

    @app.task
    async def job() -> None:
        started.append(1)
        await gate.wait()

    await job.enqueue()
    worker = app.worker(grace=10, poll=POLL, clock=clock)
    run = asyncio.create_task(worker.run())
    await wait_until(lambda: started == [1], what="the job to start")
    faulty.raise_next("extend", RuntimeError("extend broke"))
    await advance_until(clock, lambda: failure_logged(caplog, RuntimeError), step=0.01)
    # Leases are still kept while the worker drains: the job is not handed out again.
    await clock.advance(0.5)
    assert await app.stats() == QueueDepth(in_flight=1)
    gate.set()
    await advance_until(clock, run.done, what="run() to return")
    with pytest.raises(RuntimeError, match="extend broke"):
        await run
    assert started == [1]
    assert worker.counts == {"ok": 1}
    assert await app.stats() == QueueDepth()
