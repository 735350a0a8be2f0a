"""`lease_lost` counts leases that were lost, nothing else: a heartbeat crossing a settle is
not a lost lease, and a retry or dead letter re-sent after its reply was lost counts as
what it did (or, where the broker cannot tell, as neither)."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest

from aioworkers import App, Broker, Delivery, LeaseLost, QueueDepth, current_job
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.testing import FakeClock

from ..services import REDIS, REDIS_URL, delete_prefix, ensure
from .conftest import POLL, FaultyBroker, MakeApp, advance_until, running, wait_until


def lease_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "lease lost" in r.getMessage()]


async def test_a_heartbeat_crossing_an_applied_ack_is_not_a_lost_lease(
    make_app: MakeApp, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    app, faulty = make_app(visibility_timeout=0.3, clock=clock)

    @app.task
    async def job() -> None:
        pass

    # The ack is applied at once, its reply comes late: meanwhile the job is still held,
    # and the broker reports its lease gone to every heartbeat.
    reply = faulty.hold("ack")
    async with running(app.worker(poll=POLL, clock=clock), clock) as worker:
        await job.enqueue()
        await wait_until(lambda: faulty.count("ack") == 1, what="the ack")
        beats = faulty.count("extend")
        await advance_until(clock, lambda: faulty.count("extend") >= beats + 2, step=0.01)
        assert faulty.calls_of("extend")[-1].result != []  # the broker did say "not held"
        reply.set()
        await wait_until(lambda: worker.in_flight == 0, what="the ack's reply")

    assert worker.counts == {"ok": 1}
    assert lease_warnings(caplog) == []
    assert await app.stats() == QueueDepth()


class SlowExtend(FaultyBroker):
    """``extend`` reaches the broker only once ``go`` is set (a heartbeat in flight)."""

    def __init__(self, inner: Broker) -> None:
        super().__init__(inner)
        self.go = asyncio.Event()
        self.asked = 0

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
        self.asked += 1
        await self.go.wait()
        return await super().extend(deliveries, lease=lease)


async def test_a_heartbeat_answered_after_the_job_settled_is_not_a_lost_lease(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    broker = SlowExtend(MemoryBroker(visibility_timeout=0.3, clock=clock))
    app = App(broker, visibility_timeout=0.3)
    gate = asyncio.Event()

    @app.task
    async def job() -> None:
        await gate.wait()

    async with running(app.worker(poll=POLL, clock=clock), clock) as worker:
        await job.enqueue()
        await wait_until(lambda: worker.in_flight == 1, what="the job")
        # The lease loop's first beat (every 0.1 s) is sent, and waits for its answer.
        await advance_until(clock, lambda: broker.asked >= 1, step=0.01)
        gate.set()
        await wait_until(lambda: worker.counts == {"ok": 1}, what="the ack")
        broker.go.set()
        await wait_until(lambda: broker.count("extend", ok=True) >= 1, what="the late beat")
        assert broker.calls_of("extend", ok=True)[0].result != []  # "not held": it is acked
        await clock.advance(0.05)

    assert worker.counts == {"ok": 1}
    assert lease_warnings(caplog) == []


async def test_a_retry_whose_reply_was_lost_counts_as_retried(
    app_and_broker: tuple[App, FaultyBroker], caplog: pytest.LogCaptureFixture
) -> None:
    app, faulty = app_and_broker
    attempts: list[int] = []

    @app.task(retries=3, backoff=0)
    async def flaky() -> None:
        attempts.append(current_job().attempt)
        if len(attempts) == 1:
            raise RuntimeError("first try fails")

    faulty.lose_reply("retry")
    await flaky.enqueue()
    async with app.worker(poll=POLL) as worker:
        await wait_until(lambda: worker.counts.get("ok") == 1, what="the second attempt")

    # The re-sent retry was recognised as the one already applied: one new attempt only.
    assert attempts == [1, 2]
    assert faulty.count("retry") == 2
    assert worker.counts == {"retried": 1, "ok": 1}
    assert lease_warnings(caplog) == []
    assert await app.stats() == QueueDepth()


async def test_a_dead_letter_whose_reply_was_lost_counts_as_dead(
    app_and_broker: tuple[App, FaultyBroker], caplog: pytest.LogCaptureFixture
) -> None:
    app, faulty = app_and_broker

    @app.task(retries=0)
    async def doomed() -> None:
        raise RuntimeError("always")

    faulty.lose_reply("dead_letter")
    job_id = await doomed.enqueue()
    async with app.worker(poll=POLL) as worker:
        await wait_until(lambda: worker.in_flight == 0 and bool(worker.counts), what="settle")

    assert worker.counts == {"dead": 1}
    assert [letter.id for letter in await app.dlq().list()] == [job_id]
    assert lease_warnings(caplog) == []
    assert await app.stats() == QueueDepth(dead=1)


class Forgetful(MemoryBroker):
    """A broker that cannot tell a re-sent retry from one whose lease was lost."""

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> None:
        if self._owned(delivery) is None:
            raise LeaseLost(f"{delivery!r} is not held")
        await super().retry(delivery, body=body, delay=delay)


async def test_a_refused_resend_is_counted_as_neither_where_the_broker_cannot_tell(
    caplog: pytest.LogCaptureFixture,
) -> None:
    faulty = FaultyBroker(Forgetful())
    app = App(faulty)
    attempts: list[int] = []

    @app.task(retries=3, backoff=0)
    async def flaky() -> None:
        attempts.append(current_job().attempt)
        if len(attempts) == 1:
            raise RuntimeError("first try fails")

    faulty.lose_reply("retry")
    await flaky.enqueue()
    async with app.worker(poll=POLL) as worker:
        await wait_until(lambda: worker.counts.get("ok") == 1, what="the second attempt")

    assert attempts == [1, 2]
    assert worker.counts == {"ok": 1}  # the retry was applied, but nothing could say so
    assert lease_warnings(caplog) == []
    unknown = [r for r in caplog.records if "unknown" in r.getMessage()]
    assert len(unknown) == 1, [r.getMessage() for r in caplog.records]
    assert unknown[0].levelno == logging.WARNING


@asynccontextmanager
async def real_broker(name: str, visibility: float) -> AsyncIterator[Broker]:
    if name == "redis":
        ensure(REDIS)
        from aioworkers.brokers.redis import RedisBroker

        prefix = f"test-{uuid.uuid4().hex[:12]}"
        redis = RedisBroker(f"{REDIS_URL}?prefix={prefix}", visibility_timeout=visibility)
        try:
            yield redis
        finally:
            await redis.aclose()
            await delete_prefix(prefix)
        return
    from aioworkers.brokers.sqlite import SqliteBroker

    with tempfile.TemporaryDirectory(prefix="aioworkers-leases-") as directory:
        sqlite = SqliteBroker(f"sqlite:///{directory}/jobs.db", visibility_timeout=visibility)
        try:
            yield sqlite
        finally:
            await sqlite.aclose()


@pytest.mark.parametrize("name", ["redis", "sqlite"])
async def test_no_false_lease_lost_over_thousands_of_fast_jobs(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A short lease, so heartbeats (every visibility / 3) keep crossing acks; long enough
    # that a busy event loop on a loaded machine never lets a lease really lapse.
    visibility = 0.6
    async with real_broker(name, visibility) as broker:
        app = App(broker, visibility_timeout=visibility)
        done: list[int] = []

        @app.task
        async def job(n: int) -> None:
            done.append(n)
            await asyncio.sleep(0.005)

        jobs = 4000
        for start in range(0, jobs, 500):
            await app.enqueue_many([job.call(n) for n in range(start, start + 500)])
        worker = app.worker(concurrency=100, poll=POLL)
        async with asyncio.timeout(50):
            await worker.run(burst=True)

    assert sorted(done) == list(range(jobs))
    assert worker.counts == {"ok": jobs}
    assert lease_warnings(caplog) == []
