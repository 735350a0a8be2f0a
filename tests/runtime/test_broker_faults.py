"""Transient broker failures (`BrokerUnavailable`) are retried: the worker never crashes,
never loses a job, and settles each delivery exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import pytest

from aioworkers import App, ConfigError, Delivery, QueueDepth, current_job
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.testing import FakeClock

from .conftest import (
    POLL,
    FaultyBroker,
    MakeApp,
    advance_until,
    run_burst,
    running,
    wait_until,
)

Clocked = tuple[App, FaultyBroker, FakeClock]


async def test_failing_ack_is_retried_and_acks_exactly_once(clocked: Clocked) -> None:
    app, faulty, clock = clocked
    runs: Counter[str] = Counter()

    @app.task
    async def job() -> None:
        runs[current_job().id] += 1

    faulty.fail_next("ack", 3)
    ids = await app.enqueue_many([job.call() for _ in range(5)])
    worker = app.worker(poll=POLL, clock=clock)
    await run_burst(worker, clock=clock)

    assert runs == dict.fromkeys(ids, 1)
    assert faulty.count("ack", ok=False) == 3
    acked = [d.message_id for d in faulty.settled("ack")]
    assert sorted(acked) == sorted(set(acked))
    assert len(acked) == 5
    assert worker.counts == {"ok": 5}
    assert await app.stats() == QueueDepth()


async def test_ack_retrying_at_shutdown_is_finished_before_exit(clocked: Clocked) -> None:
    app, faulty, clock = clocked
    runs: list[str] = []

    @app.task
    async def job() -> None:
        runs.append(current_job().id)

    async with running(app.worker(poll=POLL, clock=clock), clock) as worker:
        faulty.fail_next("ack", 3)
        job_id = await job.enqueue()
        await wait_until(lambda: faulty.count("ack", ok=False) >= 1, what="a failed ack")
        # Leave while the ack is backing off: the exit must wait for it, not drop it.

    assert runs == [job_id]
    assert len(faulty.settled("ack")) == 1
    assert worker.counts == {"ok": 1}
    assert await app.stats() == QueueDepth()


async def test_fetch_failures_do_not_stop_the_worker(clocked: Clocked) -> None:
    app, faulty, clock = clocked
    runs: Counter[str] = Counter()

    @app.task
    async def job() -> None:
        runs[current_job().id] += 1

    ids = await app.enqueue_many([job.call() for _ in range(20)])
    faulty.fail_next("fetch", 2)
    worker = app.worker(concurrency=4, poll=POLL, clock=clock)
    await run_burst(worker, clock=clock)

    assert faulty.count("fetch", ok=False) == 2
    assert runs == dict.fromkeys(ids, 1)
    assert worker.counts == {"ok": 20}
    assert await app.stats() == QueueDepth()


async def test_broker_outage_while_running(clocked: Clocked) -> None:
    app, faulty, clock = clocked
    runs: Counter[str] = Counter()

    @app.task
    async def job() -> None:
        runs[current_job().id] += 1
        await clock.sleep(0.01)

    async with running(app.worker(concurrency=3, poll=POLL, clock=clock), clock) as worker:
        first = await app.enqueue_many([job.call() for _ in range(5)])
        await advance_until(clock, lambda: len(runs) == 5, step=0.01, what="the first batch")
        for method in ("fetch", "ack", "extend"):
            faulty.fail_while(method)
        second = await app.enqueue_many([job.call() for _ in range(5)])
        await clock.advance(0.2)
        for method in ("fetch", "ack", "extend"):
            faulty.heal(method)
        await advance_until(clock, lambda: len(runs) == 10, what="the second batch")
        await advance_until(clock, lambda: worker.counts.get("ok") == 10, what="the acks")
        assert await app.stats() == QueueDepth()

    assert runs == dict.fromkeys(first + second, 1)
    assert worker.counts == {"ok": 10}


async def test_retry_failing_transiently_still_settles(clocked: Clocked) -> None:
    app, faulty, clock = clocked
    attempts: list[int] = []

    @app.task(retries=2, backoff=0)
    async def flaky() -> None:
        attempts.append(current_job().attempt)
        if current_job().attempt == 1:
            raise RuntimeError("first time")

    faulty.fail_next("retry", 2)
    await flaky.enqueue()
    worker = app.worker(poll=POLL, clock=clock)
    await run_burst(worker, clock=clock)

    assert attempts == [1, 2]
    assert faulty.count("retry", ok=False) == 2
    assert faulty.count("retry", ok=True) == 1
    assert worker.counts == {"retried": 1, "ok": 1}
    assert await app.stats() == QueueDepth()


async def test_dead_letter_failing_transiently_still_settles(clocked: Clocked) -> None:
    app, faulty, clock = clocked
    attempts: list[int] = []

    @app.task(retries=0)
    async def doomed() -> None:
        attempts.append(current_job().attempt)
        raise RuntimeError("always")

    faulty.fail_next("dead_letter", 3)
    job_id = await doomed.enqueue()
    worker = app.worker(poll=POLL, clock=clock)
    await run_burst(worker, clock=clock)

    assert attempts == [1]
    assert faulty.count("dead_letter", ok=False) == 3
    assert faulty.count("dead_letter", ok=True) == 1
    assert worker.counts == {"dead": 1}
    assert [letter.id for letter in await app.dlq().list()] == [job_id]
    assert await app.stats() == QueueDepth(dead=1)


async def test_release_failing_transiently_at_shutdown_still_releases(clocked: Clocked) -> None:
    app, faulty, clock = clocked
    started: list[int] = []

    @app.task
    async def long() -> None:
        started.append(1)
        await clock.sleep(5)

    await long.enqueue()
    async with running(app.worker(grace=0.1, poll=POLL, clock=clock), clock) as worker:
        await wait_until(lambda: started == [1], what="the job to start")
        faulty.fail_next("release", 2)

    assert faulty.count("release", ok=False) == 2
    assert len(faulty.settled("release")) == 1
    assert worker.counts == {"released": 1}
    assert await app.stats() == QueueDepth(ready=1)


async def test_depth_failing_in_burst_mode_is_not_drained(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker
    runs: list[int] = []

    @app.task
    async def job(n: int) -> None:
        runs.append(n)

    await app.enqueue_many([job.call(n) for n in range(3)])
    faulty.fail_next("depth", 3)
    await run_burst(app.worker(poll=POLL))

    assert sorted(runs) == [0, 1, 2]
    assert await app.stats() == QueueDepth()


async def test_ack_outage_longer_than_the_lease_does_not_redeliver(
    make_app: MakeApp, clock: FakeClock
) -> None:
    app, faulty = make_app(visibility_timeout=0.3, clock=clock)
    runs: list[str] = []

    @app.task
    async def job() -> None:
        runs.append(current_job().id)

    faulty.fail_while("ack")
    async with running(app.worker(poll=POLL, clock=clock), clock) as worker:
        job_id = await job.enqueue()
        await wait_until(lambda: faulty.count("ack", ok=False) >= 1, what="a failed ack")
        # Several leases long: the job waiting for its ack must keep its lease.
        await clock.advance(1.2)
        assert worker.in_flight == 1
        faulty.heal("ack")
        await advance_until(clock, lambda: worker.counts.get("ok") == 1, what="the ack")
        assert await app.stats() == QueueDepth()

    assert runs == [job_id]
    assert len(faulty.settled("ack")) == 1
    assert faulty.count("extend", ok=True) >= 3


async def test_an_ack_that_fails_for_good_counts_nothing_and_stops_the_worker() -> None:
    class ReadOnly(MemoryBroker):
        async def ack(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
            raise ConfigError("the queue file is read-only")

    app = App(ReadOnly(), concurrency=5)

    @app.task
    async def noop() -> None:
        pass

    for _ in range(3):
        await noop.enqueue()
    worker = app.worker(poll=POLL)
    # Raised as itself, not wrapped in the task groups' exception groups.
    with pytest.raises(ConfigError, match="read-only"):
        async with asyncio.timeout(5):
            await worker.run(burst=True)
    # Not acked: not "ok"; the broker hands the jobs out again once their leases lapse.
    assert "ok" not in worker.counts
    assert await app.stats() == QueueDepth(in_flight=3)
