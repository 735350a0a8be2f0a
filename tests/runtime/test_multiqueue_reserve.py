"""A worker on several queues reserves its slots before it fetches: it never holds more
deliveries than its concurrency, so what it cannot start stays with the broker for other
workers; and no queue is starved by another queue's waiting fetch."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aioworkers import App, Delivery, QueueDepth
from aioworkers._runtime.clock import SYSTEM_CLOCK, Clock
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.testing import FakeClock

from .conftest import POLL, FaultyBroker, advance_until, running, wait_until

QUEUES = ["q0", "q1", "q2", "q3", "q4"]


class Holding(FaultyBroker):
    """Counts the deliveries this side holds: fetched and not yet settled."""

    def __init__(self, inner: MemoryBroker, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(inner)
        self.clock = clock
        self.held = 0
        self.peak = 0

    async def fetch(
        self, queue: str, *, max_messages: int, wait: float, lease: float
    ) -> list[Delivery]:
        # A round trip, as on a networked broker: the fetches on the queues overlap.
        await self.clock.sleep(0.005)
        got = await super().fetch(queue, max_messages=max_messages, wait=wait, lease=lease)
        self.held += len(got)
        self.peak = max(self.peak, self.held)
        return got

    async def ack(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        lost = await super().ack(deliveries)
        self.held -= len(deliveries)
        return lost

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        await super().release(deliveries)
        self.held -= len(deliveries)


def worker_app(broker: Holding, ran: list[tuple[str, int]], name: str) -> App:
    app = App(broker, queue=QUEUES[0])

    @app.task(name="work")
    async def work(n: int) -> None:
        ran.append((name, n))
        await broker.clock.sleep(0.05)

    return app


async def test_a_one_slot_worker_on_five_queues_holds_one_job_and_leaves_the_rest() -> None:
    inner = MemoryBroker()
    small_side, big_side = Holding(inner), Holding(inner)
    ran: list[tuple[str, int]] = []
    small = worker_app(small_side, ran, "small")
    big = worker_app(big_side, ran, "big")
    work = small.tasks["work"]
    await small.enqueue_many(
        [work.options(queue=q).call(i * 10 + n) for i, q in enumerate(QUEUES) for n in range(4)]
    )

    async with small.worker(concurrency=1, queues=QUEUES, poll=POLL):
        await wait_until(lambda: len(ran) == 1, what="the small worker's first job")
        # Every queue has work, and the one-slot worker is busy: the rest is the broker's.
        assert sum([(await inner.depth(q)).in_flight for q in QUEUES]) == 1
        async with big.worker(concurrency=5, queues=QUEUES, poll=POLL):
            await wait_until(lambda: len(ran) == 20, what="every job")
            await wait_until(lambda: big_side.held == small_side.held == 0, what="the acks")

    assert small_side.peak == 1
    assert [name for name, _ in ran].count("big") > 5
    assert sorted(n for _, n in ran) == sorted(i * 10 + n for i in range(5) for n in range(4))
    for q in QUEUES:
        assert await inner.depth(q) == QueueDepth()


async def test_with_fewer_slots_than_queues_every_queue_gets_its_turn(clock: FakeClock) -> None:
    # One queue with work behind four empty ones, each empty one fetched with a long poll:
    # the busy queue must not wait a full poll per empty queue for each job.
    inner = MemoryBroker(clock=clock)
    side = Holding(inner, clock)
    ran: list[tuple[str, int]] = []
    app = worker_app(side, ran, "one")
    work = app.tasks["work"]
    await app.enqueue_many([work.options(queue="q4").call(n) for n in range(6)])

    poll = 0.5
    async with running(app.worker(concurrency=1, queues=QUEUES, poll=poll, clock=clock), clock):
        took = await advance_until(clock, lambda: len(ran) == 6, step=0.01, what="every job")
    assert side.peak == 1
    # A round of the four empty queues takes about one poll (each polled for poll / 5):
    # six jobs in about six polls, not the 24 that four full polls a job would cost.
    assert took < 6 * poll + 1.0, f"took {took:.1f}s"


async def test_a_fetch_that_brings_fewer_than_reserved_gives_the_rest_back(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker
    gate = asyncio.Event()

    @app.task
    async def hold() -> None:
        await gate.wait()

    async with app.worker(concurrency=4, queues=["default", "other"], poll=POLL) as worker:
        await hold.enqueue()
        await wait_until(lambda: worker.in_flight == 1, what="the first job")
        await app.enqueue_many([hold.options(queue="other").call() for _ in range(5)])
        # Three slots are free: the other queue gets exactly those, however the fetches
        # on the two queues interleave.
        await wait_until(lambda: worker.in_flight == 4, what="the slots to fill")
        await asyncio.sleep(5 * POLL)
        assert worker.in_flight == 4
        assert await app.stats("other") == QueueDepth(ready=2, in_flight=3)
        asked = [c.kwargs["max_messages"] for c in faulty.calls_of("fetch")]
        assert max(asked) <= 4
        gate.set()
        await wait_until(lambda: worker.counts == {"ok": 6}, what="every job")
