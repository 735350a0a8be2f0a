"""Unique enqueue on the memory broker and store: while a job with the key is queued,
delayed, running or retrying, enqueue returns it and publishes nothing; the key is free
again once the job succeeded or failed, or once ``unique_for`` has passed; a job may
enqueue its own successor; a failed publish holds nothing."""

from __future__ import annotations

import pytest

from aioworkers import App, BrokerUnavailable, Reject, Retry, current_job
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.testing import FakeClock

from ..runtime.conftest import advance_until, running
from .conftest import VISIBILITY, CountingStore


async def test_a_second_enqueue_returns_the_first_job(app: App) -> None:
    @app.task
    async def sync(account: int) -> None: ...

    first = await sync.options(unique_key="sync:42", unique_for=600).enqueue(42)
    second = await sync.options(unique_key="sync:42", unique_for=600).enqueue(42)
    other = await sync.options(unique_key="sync:43", unique_for=600).enqueue(43)
    assert second == first
    assert second.id == first.id  # the handle is the first job's
    assert other != first
    assert (await app.stats()).ready == 2


async def test_the_key_is_free_once_the_job_succeeded(app: App, clock: FakeClock) -> None:
    ran: list[str] = []

    @app.task
    async def sync(account: int) -> None:
        ran.append(current_job().id)

    first = await sync.options(unique_key="sync:42").enqueue(42)
    worker = app.worker(concurrency=5, poll=0.05, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: len(ran) == 1)
        await advance_until(clock, lambda: worker.in_flight == 0)
        second = await sync.options(unique_key="sync:42").enqueue(42)
        assert second != first
        await advance_until(clock, lambda: len(ran) == 2)
    assert ran == [first, second]


async def test_a_retrying_job_holds_the_key_and_a_dead_one_frees_it(
    app: App, clock: FakeClock
) -> None:
    attempts: list[int] = []

    @app.task(retries=1)
    async def sync(account: int) -> None:
        attempts.append(current_job().attempt)
        if len(attempts) == 1:
            raise Retry(delay=10)
        raise Reject("bad account")

    first = await sync.options(unique_key="sync:42").enqueue(42)
    worker = app.worker(concurrency=5, poll=0.05, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: len(attempts) == 1)
        # Retrying (delayed for 10 s): still the job of the key.
        assert await sync.options(unique_key="sync:42").enqueue(42) == first
        await advance_until(clock, lambda: len(attempts) == 2, within=30)
        await advance_until(clock, lambda: worker.in_flight == 0)
        # Dead-lettered: the key is free.
        assert await sync.options(unique_key="sync:42").enqueue(42) != first


async def test_a_job_may_enqueue_its_own_successor(app: App, clock: FakeClock) -> None:
    ran: list[tuple[str, int]] = []
    successors: list[str] = []

    @app.task
    async def sync(round_: int) -> None:
        ran.append((current_job().id, round_))
        if round_ < 3:
            # The key is held by this very job: it passes to the successor.
            successors.append(await sync.options(unique_key="sync").enqueue(round_ + 1))

    await sync.options(unique_key="sync").enqueue(1)
    worker = app.worker(concurrency=5, poll=0.05, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: len(ran) == 3)
        await advance_until(clock, lambda: worker.in_flight == 0)
    assert [r for _, r in ran] == [1, 2, 3]
    assert [job_id for job_id, _ in ran[1:]] == successors
    # The last one ended: nothing holds the key.
    assert await sync.options(unique_key="sync").enqueue(9) not in successors


async def test_a_successor_holds_the_key_after_its_parent_ended(app: App, clock: FakeClock) -> None:
    successor: list[str] = []

    @app.task
    async def parent() -> None:
        later = child.options(unique_key="k", unique_for=600, delay=100)
        successor.append(await later.enqueue())

    @app.task
    async def child() -> None: ...

    await parent.options(unique_key="k", unique_for=600).enqueue()
    worker = app.worker(concurrency=5, poll=0.05, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: bool(successor))
        await advance_until(clock, lambda: worker.in_flight == 0)
        # The parent ended (freeing nothing of the child's): the delayed child holds it.
        assert await child.options(unique_key="k").enqueue() == successor[0]


async def test_the_hold_lapses_after_unique_for(app: App, clock: FakeClock) -> None:
    @app.task
    async def sync() -> None: ...

    first = await sync.options(unique_key="k", unique_for=60).enqueue()
    await clock.advance(59)
    assert await sync.options(unique_key="k", unique_for=60).enqueue() == first
    await clock.advance(2)
    assert await sync.options(unique_key="k", unique_for=60).enqueue() != first


async def test_a_failed_publish_holds_no_key(clock: FakeClock) -> None:
    class Down(MemoryBroker):
        down = True

        async def publish(self, queue: str, bodies: list[bytes], *, delay: float = 0.0) -> None:
            if self.down:
                raise BrokerUnavailable("down")
            await super().publish(queue, bodies, delay=delay)

    broker = Down(visibility_timeout=VISIBILITY, clock=clock)
    app = App(broker, store=CountingStore(clock), visibility_timeout=VISIBILITY)

    @app.task
    async def sync() -> None: ...

    with pytest.raises(BrokerUnavailable):
        await sync.options(unique_key="k").enqueue()
    broker.down = False
    job = await sync.options(unique_key="k").enqueue()
    assert (await app.stats()).ready == 1
    assert await sync.options(unique_key="k").enqueue() == job


async def test_jobs_without_a_unique_key_touch_no_unique_state(
    app: App, clock: FakeClock, store: CountingStore
) -> None:
    ran: list[int] = []

    @app.task
    async def plain(n: int) -> None:
        ran.append(n)

    for n in range(5):
        await plain.enqueue(n)
    worker = app.worker(concurrency=5, poll=0.05, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: len(ran) == 5)
    assert store.calls["hold_unique"] == store.calls["free_unique"] == 0


def test_unique_for_must_be_positive(app: App) -> None:
    @app.task
    async def sync() -> None: ...

    with pytest.raises(ValueError, match="unique_for"):
        sync.options(unique_key="k", unique_for=0)
