"""Leases: a long job keeps its lease while its worker lives; a lost lease cancels the run
and the job is never acked over the new owner. On a fake clock the worker and the broker
share: leases run out and heartbeats beat when the test moves time."""

from __future__ import annotations

import asyncio

import pytest

from aioworkers import App, QueueDepth, current_job
from aioworkers.envelope import decode
from aioworkers.testing import FakeClock

from .conftest import (
    POLL,
    FaultyBroker,
    MakeApp,
    advance_until,
    running,
    stats_eventually,
    wait_until,
)


async def test_long_job_is_not_redelivered(make_app: MakeApp, clock: FakeClock) -> None:
    app, faulty = make_app(visibility_timeout=0.3, clock=clock)
    runs: list[int] = []
    finished: list[int] = []

    @app.task
    async def long() -> None:
        runs.append(current_job().delivery_count)
        await clock.sleep(1.0)  # more than three leases
        finished.append(1)

    await long.enqueue()
    async with running(app.worker(poll=POLL, clock=clock), clock) as worker:
        # The handler returning is not the end: the job is held until its ack is confirmed.
        took = await advance_until(
            clock, lambda: finished == [1] and worker.in_flight == 0, what="the ack"
        )
    assert took <= 1.0 + POLL  # acked as soon as it finished: no wait for a lease

    assert runs == [1]
    assert worker.counts == {"ok": 1}
    # Heartbeats every visibility / 3 while the job ran: 1.0 / 0.1.
    assert faulty.count("extend", ok=True) >= 9
    assert await app.stats() == QueueDepth()


async def test_extend_failures_within_the_lease_are_survived(
    make_app: MakeApp, clock: FakeClock
) -> None:
    app, faulty = make_app(visibility_timeout=0.3, clock=clock)
    runs: list[int] = []

    @app.task
    async def long() -> None:
        runs.append(1)
        await clock.sleep(0.8)

    await long.enqueue()
    async with running(app.worker(poll=POLL, clock=clock), clock) as worker:
        # One failed heartbeat in three still leaves the lease alive.
        await wait_until(lambda: runs == [1], what="the job to start")
        faulty.fail_next("extend", 1)
        await advance_until(clock, lambda: worker.counts.get("ok") == 1, what="the ack")

    assert runs == [1]
    assert faulty.count("extend", ok=False) == 1
    assert await app.stats() == QueueDepth()


async def test_lease_reported_lost_cancels_the_run_and_does_not_ack(
    make_app: MakeApp, clock: FakeClock
) -> None:
    app, faulty = make_app(visibility_timeout=0.3, clock=clock)
    attempts: list[int] = []
    cancelled: list[int] = []
    finished: list[int] = []

    @app.task
    async def long() -> None:
        attempts.append(current_job().delivery_count)
        try:
            await clock.sleep(1.0)
        except asyncio.CancelledError:
            cancelled.append(1)
            faulty.lose_leases = False  # the broker recovers before the next delivery
            raise
        finished.append(1)

    await long.enqueue()
    faulty.lose_leases = True
    async with running(app.worker(poll=POLL, clock=clock), clock) as worker:
        # The first heartbeat learns the lease is gone.
        took = await advance_until(clock, lambda: cancelled == [1], what="the cancel")
        assert took <= 0.1 + POLL
        first = faulty.calls_of("fetch", ok=True)[0].result[0]
        # Nothing is settled for a lost lease; the broker redelivers once the lease expires.
        await advance_until(clock, lambda: finished == [1], what="the second run")

    assert first not in faulty.settled("ack")
    assert first not in faulty.settled("release")
    assert len(faulty.settled("ack")) == 1
    assert attempts == [1, 2]  # redelivered by lease expiry, not handed back
    assert cancelled == [1]
    assert worker.counts.get("ok") == 1
    assert worker.counts.get("lease_lost") == 1
    assert await app.stats() == QueueDepth()


async def test_lease_taken_by_another_consumer_is_never_acked(
    make_app: MakeApp, clock: FakeClock
) -> None:
    app, faulty = make_app(visibility_timeout=0.3, clock=clock)
    runs: list[int] = []
    cancelled: list[int] = []
    finished: list[int] = []

    @app.task
    async def long() -> None:
        runs.append(1)
        try:
            await clock.sleep(1.5)
        except asyncio.CancelledError:
            cancelled.append(1)
            raise
        finished.append(1)

    job_id = await long.enqueue()
    # Concurrency 1: the worker's own fetcher waits for room, so the expired lease goes to
    # the other consumer below, not back to this worker.
    async with running(app.worker(concurrency=1, poll=POLL, clock=clock), clock) as worker:
        await wait_until(lambda: runs == [1], what="the job to start")
        # The worker is partitioned from the broker: its heartbeats fail, the lease runs out
        # and another consumer takes the job.
        faulty.fail_while("extend")
        fetch = asyncio.create_task(faulty.inner.fetch("default", max_messages=1, wait=1.0))
        await advance_until(clock, fetch.done, what="the lease to run out")
        (theirs,) = fetch.result()
        assert theirs.count == 2
        faulty.heal("extend")
        # The next heartbeat learns the lease is gone and cancels the run.
        took = await advance_until(clock, lambda: cancelled == [1], what="the cancel")
        assert took <= 0.1 + POLL
        await wait_until(lambda: worker.in_flight == 0, what="the run to be settled")
        # The new owner's lease is untouched: neither acked nor released by the old one.
        assert await app.stats() == QueueDepth(in_flight=1)

    assert finished == []
    assert faulty.settled("ack") == []
    assert worker.counts.get("ok", 0) == 0
    assert await app.stats() == QueueDepth(in_flight=1)
    # The new owner finishes the job.
    await faulty.inner.ack([theirs])
    assert await app.stats() == QueueDepth()
    assert decode(theirs.body).id == job_id


@pytest.mark.parametrize("fails", [False, True], ids=["ok-ack-refused", "failed-no-retry"])
async def test_a_job_whose_lease_moved_mid_run_is_counted_lease_lost_and_left_alone(
    app_and_broker: tuple[App, FaultyBroker], fails: bool
) -> None:
    app, faulty = app_and_broker
    gate = asyncio.Event()
    runs: list[int] = []

    @app.task(retries=3, backoff=0)
    async def late() -> None:
        runs.append(1)
        await gate.wait()
        if fails:
            raise RuntimeError("too late")

    await late.enqueue()
    async with app.worker(concurrency=1, poll=POLL) as worker:
        await wait_until(lambda: runs == [1], what="the job to start")
        (mine,) = faulty.calls_of("fetch", ok=True)[0].result
        # The lease moves to another consumer between two heartbeats.
        await faulty.inner.release([mine])
        (theirs,) = await faulty.inner.fetch("default", max_messages=1, wait=0)
        gate.set()
        await wait_until(lambda: worker.in_flight == 0, what="the run to be settled")

    if fails:
        assert faulty.count("retry", ok=True) == 0  # not retried over the new owner
    else:
        assert faulty.calls_of("ack", ok=True)[0].result == [mine]  # the broker refused it
    assert worker.counts == {"lease_lost": 1}
    assert await app.stats() == QueueDepth(in_flight=1)  # still the new owner's
    await faulty.inner.ack([theirs])


async def test_stats_show_held_jobs_in_flight(app: App) -> None:
    gate = asyncio.Event()

    @app.task
    async def hold() -> None:
        await gate.wait()

    await app.enqueue_many([hold.call() for _ in range(3)])
    async with app.worker(concurrency=2, poll=POLL) as worker:
        await stats_eventually(app, QueueDepth(ready=1, in_flight=2))
        assert worker.in_flight == 2
        gate.set()
        await stats_eventually(app, QueueDepth())
    assert worker.counts == {"ok": 3}
