"""Shutdown: quiet -> drain within grace -> cancel and release the rest; a second stop
cancels at once; nothing fetched is lost and nothing new is fetched after quiet."""

from __future__ import annotations

import asyncio

import pytest

from aioworkers import App, QueueDepth, current_job
from aioworkers.testing import FakeClock

from .conftest import POLL, FaultyBroker, MakeApp, running, stats_eventually, wait_until


async def fetch_count(app_and_broker: tuple[App, FaultyBroker]) -> int:
    """Take the only ready message directly and return its delivery count (then hand it
    back), to check a release did not charge a delivery."""
    _, faulty = app_and_broker
    (delivery,) = await faulty.inner.fetch("default", max_messages=10, wait=0, lease=1.0)
    await faulty.inner.release([delivery])
    return delivery.count


async def test_exit_waits_for_a_job_within_grace(make_app: MakeApp, clock: FakeClock) -> None:
    app, faulty = make_app(clock=clock)
    started: list[str] = []
    finished: list[str] = []

    @app.task
    async def half_second() -> None:
        started.append(current_job().id)
        await clock.sleep(0.5)
        finished.append(current_job().id)

    job_id = await half_second.enqueue()
    async with running(app.worker(grace=2, poll=POLL, clock=clock), clock) as worker:
        await wait_until(lambda: started == [job_id], what="the job to start")
        t0 = clock.monotonic()
    # Stopped once the job was done, not before, and not at the end of the grace period.
    assert 0.5 <= clock.monotonic() - t0 <= 0.5 + POLL + 1e-9

    assert finished == [job_id]
    assert worker.counts == {"ok": 1}
    assert worker.state == "STOPPED"
    assert [d.message_id for d in faulty.settled("ack")] == ["1"]
    # Not even an empty release round trip for a fetch that came back with nothing.
    assert faulty.count("release") == 0
    assert await app.stats() == QueueDepth()


async def test_job_past_grace_is_cancelled_and_released(
    make_app: MakeApp, clock: FakeClock
) -> None:
    app, faulty = make_app(clock=clock)
    started: list[str] = []
    cancelled: list[str] = []

    @app.task
    async def five_seconds() -> None:
        started.append(current_job().id)
        try:
            await clock.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(current_job().id)
            raise

    job_id = await five_seconds.enqueue()
    async with running(app.worker(grace=0.2, poll=POLL, clock=clock), clock) as worker:
        await wait_until(lambda: started == [job_id], what="the job to start")
        t0 = clock.monotonic()
    # Cancelled when the grace period ran out (it starts once the fetch under way has
    # returned, within a poll), and handed back at once.
    assert 0.2 <= clock.monotonic() - t0 <= 0.2 + 2 * POLL + 1e-9

    assert cancelled == [job_id]
    assert worker.counts == {"released": 1}
    assert faulty.count("ack") == 0
    assert len(faulty.settled("release")) == 1
    # Visible again at once, and the hand-back is not charged as a delivery.
    assert await app.stats() == QueueDepth(ready=1)
    assert await fetch_count((app, faulty)) == 1


async def test_second_stop_cancels_at_once(make_app: MakeApp, clock: FakeClock) -> None:
    app, _ = make_app(clock=clock)
    started: list[int] = []
    cancelled: list[int] = []

    @app.task
    async def five_seconds(n: int) -> None:
        started.append(n)
        try:
            await clock.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(n)
            raise

    await app.enqueue_many([five_seconds.call(n) for n in range(3)])
    worker = app.worker(grace=30, poll=POLL, clock=clock)
    run = asyncio.create_task(worker.run())
    await wait_until(lambda: len(started) == 3, what="the jobs to start")

    worker.stop()
    await clock.advance(1.0)
    # The first stop only quiets: the jobs go on within the grace period.
    assert not run.done()
    assert cancelled == []
    assert worker.state == "QUIET"

    t0 = clock.monotonic()
    worker.stop()
    await asyncio.wait_for(run, 5)
    assert clock.monotonic() == t0  # at once: nothing waited on the clock

    assert sorted(cancelled) == [0, 1, 2]
    assert worker.counts == {"released": 3}
    assert await app.stats() == QueueDepth(ready=3)


async def test_fetched_but_not_started_deliveries_are_released(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker
    ran: list[int] = []

    @app.task
    async def job(n: int) -> None:
        ran.append(n)

    await app.enqueue_many([job.call(n) for n in range(3)])
    # The fetch takes the messages, but its reply arrives only after the worker went quiet.
    reply = faulty.hold("fetch")
    async with app.worker(poll=POLL) as worker:
        await wait_until(lambda: faulty.count("fetch") == 1, what="the fetch")
        assert len(faulty.calls_of("fetch")[0].result) == 3
        assert await app.stats() == QueueDepth(in_flight=3)
        worker.quiet()
        reply.set()

    assert ran == []
    assert len(faulty.settled("release")) == 3
    assert faulty.count("ack") == 0
    assert await app.stats() == QueueDepth(ready=3)
    got = await faulty.inner.fetch("default", max_messages=10, wait=0, lease=1.0)
    assert [d.count for d in got] == [1, 1, 1]


async def test_runs_cancelled_before_they_start_are_released(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker
    ran: list[int] = []

    @app.task
    async def job(n: int) -> None:
        ran.append(n)

    await app.enqueue_many([job.call(n) for n in range(3)])
    reply = faulty.hold("fetch")
    worker = app.worker(grace=30, poll=POLL)
    run = asyncio.create_task(worker.run())
    await wait_until(lambda: faulty.count("fetch") == 1, what="the fetch")

    def stop_now() -> None:
        worker.stop()
        worker.stop()

    # Let the reply through, and stop twice right after the worker has created the tasks
    # for its runs but before any of them took its first step.
    reply.set()
    asyncio.get_running_loop().call_soon(stop_now)
    await asyncio.wait_for(run, 2.0)

    assert ran == []
    assert worker.counts == {"released": 3}
    assert worker.in_flight == 0
    assert await app.stats() == QueueDepth(ready=3)


async def test_no_new_jobs_are_fetched_after_quiet(make_app: MakeApp, clock: FakeClock) -> None:
    app, faulty = make_app(clock=clock)
    gate = asyncio.Event()
    ran: list[int] = []

    @app.task
    async def job(n: int) -> None:
        ran.append(n)
        await gate.wait()

    await job.enqueue(0)
    async with running(app.worker(poll=POLL, clock=clock), clock) as worker:
        await wait_until(lambda: ran == [0], what="the first job")
        worker.quiet()
        assert worker.state == "QUIET"
        await clock.advance(2 * POLL)  # any fetch under way returns
        fetches = faulty.count("fetch")
        await job.enqueue(1)
        await clock.advance(4 * POLL)
        assert faulty.count("fetch") == fetches
        assert ran == [0]
        assert await app.stats() == QueueDepth(ready=1, in_flight=1)
        # Jobs in flight go on after quiet.
        gate.set()
        await stats_eventually(app, QueueDepth(ready=1))

    assert ran == [0]
    assert worker.counts == {"ok": 1}


async def test_stop_before_anything_arrives_returns_promptly(app: App) -> None:
    @app.task
    async def job() -> None:
        pass

    async with app.worker(poll=POLL) as worker:
        assert worker.state == "RUNNING"
    assert worker.state == "STOPPED"
    assert worker.counts == {}


async def test_a_worker_runs_once(app: App) -> None:
    worker = app.worker(poll=POLL)
    async with worker:
        pass
    with pytest.raises(RuntimeError, match="runs once"):
        await worker.run()


async def test_startup_and_shutdown_hooks_bracket_the_run(app: App) -> None:
    events: list[str] = []

    @app.on_startup
    async def up() -> None:
        events.append("startup")

    @app.on_shutdown
    async def down() -> None:
        events.append("shutdown")

    @app.task
    async def job() -> None:
        events.append("job")

    async with app.worker(poll=POLL):
        assert events == ["startup"]
        await job.enqueue()
        await wait_until(lambda: "job" in events, what="the job")
    assert events == ["startup", "job", "shutdown"]


async def test_worker_repr_shows_state_and_in_flight(app: App) -> None:
    gate = asyncio.Event()

    @app.task
    async def hold() -> None:
        await gate.wait()

    worker = app.worker(concurrency=5, queues=["default", "other"], poll=POLL)
    assert repr(worker) == "<Worker FaultyBroker:default,other IDLE in_flight=0/5>"
    await app.enqueue_many([hold.call(), hold.call()])
    async with worker:
        await wait_until(lambda: worker.in_flight == 2, what="two jobs in flight")
        assert repr(worker) == "<Worker FaultyBroker:default,other RUNNING in_flight=2/5>"
        worker.quiet()
        assert repr(worker) == "<Worker FaultyBroker:default,other QUIET in_flight=2/5>"
        gate.set()
    assert repr(worker) == "<Worker FaultyBroker:default,other STOPPED in_flight=0/5>"


async def test_worker_repr_with_a_url(memory_app: App) -> None:
    worker = memory_app.worker(concurrency=7)
    assert repr(worker) == "<Worker memory://:default IDLE in_flight=0/7>"


async def test_quiet_keeps_the_worker_until_stop(make_app: MakeApp, clock: FakeClock) -> None:
    app, _ = make_app(clock=clock)
    ran: list[int] = []

    @app.task
    async def job(n: int) -> None:
        ran.append(n)

    await job.enqueue(0)
    worker = app.worker(poll=POLL, clock=clock)
    run = asyncio.create_task(worker.run())
    await wait_until(lambda: ran == [0], what="the first job")
    worker.quiet()
    await clock.advance(60)
    # Quiet is not stop: the worker stays up, idle, until told to stop.
    assert not run.done()
    assert worker.state == "QUIET"
    worker.stop()
    await asyncio.wait_for(run, 2)
    assert worker.state == "STOPPED"


async def test_each_fetcher_stops_fetching_on_its_queue_at_shutdown(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker

    @app.task
    async def job() -> None:
        pass

    async with app.worker(poll=POLL, queues=["a", "b"]):
        await job.options(queue="b").enqueue()
        await stats_eventually(app, QueueDepth(), queue="b")
    # A push-based broker hands its prefetched deliveries back here, before the drain.
    assert sorted(c.args[0] for c in faulty.calls_of("stop_fetching")) == ["a", "b"]
