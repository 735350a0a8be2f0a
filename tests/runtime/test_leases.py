"""Leases: a long job keeps its lease while its worker lives; a lost lease cancels the run
and the job is never acked over the new owner."""

from __future__ import annotations

import asyncio
import time

import pytest

from aioworkers import App, QueueDepth, current_job
from aioworkers.envelope import decode

from .conftest import POLL, FaultyBroker, MakeApp, stats_eventually, wait_until


async def test_long_job_is_not_redelivered(make_app: MakeApp) -> None:
    app, faulty = make_app(visibility_timeout=0.3)
    runs: list[int] = []
    finished: list[int] = []

    @app.task
    async def long() -> None:
        runs.append(current_job().delivery_count)
        await asyncio.sleep(1.0)
        finished.append(1)

    await long.enqueue()
    started = time.monotonic()
    async with app.worker(poll=POLL) as worker:
        await wait_until(lambda: finished == [1], within=3, what="the job to finish")
        # The handler returning is not the end: the job is held until its ack is confirmed.
        await wait_until(lambda: worker.in_flight == 0, what="the ack")
    assert time.monotonic() - started < 2.0

    assert runs == [1]
    assert worker.counts == {"ok": 1}
    # Heartbeats every visibility / 3 while the job ran.
    assert faulty.count("extend", ok=True) >= 5
    assert await app.stats() == QueueDepth()


async def test_extend_failures_within_the_lease_are_survived(make_app: MakeApp) -> None:
    app, faulty = make_app(visibility_timeout=0.3)
    runs: list[int] = []

    @app.task
    async def long() -> None:
        runs.append(1)
        await asyncio.sleep(0.8)

    await long.enqueue()
    async with app.worker(poll=POLL) as worker:
        # One failed heartbeat in three still leaves the lease alive.
        await wait_until(lambda: runs == [1], what="the job to start")
        faulty.fail_next("extend", 1)
        await wait_until(lambda: worker.counts.get("ok") == 1, within=3, what="the ack")

    assert runs == [1]
    assert faulty.count("extend", ok=False) == 1
    assert await app.stats() == QueueDepth()


async def test_lease_reported_lost_cancels_the_run_and_does_not_ack(
    make_app: MakeApp,
) -> None:
    app, faulty = make_app(visibility_timeout=0.3)
    attempts: list[int] = []
    cancelled: list[int] = []
    finished: list[int] = []

    @app.task
    async def long() -> None:
        attempts.append(current_job().delivery_count)
        try:
            await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            cancelled.append(1)
            faulty.lose_leases = False  # the broker recovers before the next delivery
            raise
        finished.append(1)

    await long.enqueue()
    faulty.lose_leases = True
    async with app.worker(poll=POLL) as worker:
        await wait_until(lambda: cancelled == [1], within=2, what="the run to be cancelled")
        first = faulty.calls_of("fetch", ok=True)[0].result[0]
        # Nothing is settled for a lost lease; the broker redelivers once the lease expires.
        await wait_until(lambda: finished == [1], within=3, what="the second run")

    assert first not in faulty.settled("ack")
    assert first not in faulty.settled("release")
    assert len(faulty.settled("ack")) == 1
    assert attempts == [1, 2]  # redelivered by lease expiry, not handed back
    assert cancelled == [1]
    assert worker.counts.get("ok") == 1
    assert worker.counts.get("lease_lost") == 1
    assert await app.stats() == QueueDepth()


async def test_lease_taken_by_another_consumer_is_never_acked(make_app: MakeApp) -> None:
    app, faulty = make_app(visibility_timeout=0.3)
    runs: list[int] = []
    cancelled: list[int] = []
    finished: list[int] = []

    @app.task
    async def long() -> None:
        runs.append(1)
        try:
            await asyncio.sleep(1.5)
        except asyncio.CancelledError:
            cancelled.append(1)
            raise
        finished.append(1)

    job_id = await long.enqueue()
    # Concurrency 1: the worker's own fetcher waits for room, so the expired lease goes to
    # the other consumer below, not back to this worker.
    async with app.worker(concurrency=1, poll=POLL) as worker:
        await wait_until(lambda: runs == [1], what="the job to start")
        # The worker is partitioned from the broker: its heartbeats fail, the lease runs out
        # and another consumer takes the job.
        faulty.fail_while("extend")
        (theirs,) = await faulty.inner.fetch("default", max_messages=1, wait=1.0)
        assert theirs.count == 2
        faulty.heal("extend")
        # The next heartbeat learns the lease is gone and cancels the run.
        await wait_until(lambda: cancelled == [1], within=1, what="the run to be cancelled")
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
