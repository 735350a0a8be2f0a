"""The lease is given per call and honoured by every broker: a delivery fetched with a short
lease and extended with a longer one is not handed out again before the longer one runs
out, whatever the broker was built with; then it is, counted once more."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest

from aioworkers import QueueDepth
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.testing import FakeClock
from aioworkers.testing.conformance import BrokerCase

from .conftest import amqp_case, fetch_n, memory_case, redis_case, sqlite_case, sqs_case

CASES: dict[str, Callable[[], AbstractAsyncContextManager[BrokerCase]]] = {
    "amqp": amqp_case,
    "memory": memory_case,
    "redis": redis_case,
    "sqlite": sqlite_case,
    "sqs": sqs_case,
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_an_extend_with_a_longer_lease_than_the_fetch_holds_until_it_runs_out(
    name: str,
) -> None:
    # Real timers: each broker's own lease keeping (server idle times, receipt visibility,
    # rows' visible_at, local tables) is what is under test. The times scale with the
    # broker's granularity (SQS: whole seconds).
    async with CASES[name]() as case:
        broker, queue, lease = case.broker, case.queue(), case.lease
        await broker.publish(queue, [b"long job"])
        (d,) = await fetch_n(broker, queue, 1, within=case.slack + 1, lease=lease)
        leased = time.monotonic()
        assert await broker.extend([d], lease=3 * lease) == []

        # Past the fetch's lease, twice over: nothing for another worker.
        assert await fetch_n(broker, queue, 1, within=2 * lease, lease=lease) == []
        assert time.monotonic() - leased >= 2 * lease

        (again,) = await fetch_n(broker, queue, 1, within=lease + case.slack + 1, lease=lease)
        assert time.monotonic() - leased >= 3 * lease - 0.05
        assert (again.message_id, again.count) == (d.message_id, 2)
        assert await broker.ack([d]) == [d]  # the first delivery's lease is gone
        assert await broker.ack([again]) == []


async def test_on_a_fake_clock_the_memory_broker_keeps_each_lease_to_the_instant() -> None:
    clock = FakeClock()
    broker = MemoryBroker(visibility_timeout=30.0, clock=clock)
    await broker.publish("q", [b"a", b"b"])
    a, b = await broker.fetch("q", max_messages=2, wait=0, lease=1.0)
    assert await broker.extend([a], lease=3.0) == []
    assert await broker.extend([b], lease=0.5) == []  # shorter than the fetch's: from now

    await clock.advance(0.49)
    assert await broker.fetch("q", max_messages=2, wait=0) == []
    await clock.advance(0.01)
    (b2,) = await broker.fetch("q", max_messages=2, wait=0, lease=10.0)
    assert (b2.message_id, b2.count) == (b.message_id, 2)

    await clock.advance(2.49)  # 2.99 s after the extend of a
    assert await broker.fetch("q", max_messages=2, wait=0) == []
    assert await broker.depth("q") == QueueDepth(in_flight=2)
    await clock.advance(0.01)
    (a2,) = await broker.fetch("q", max_messages=2, wait=0)
    assert (a2.message_id, a2.count) == (a.message_id, 2)
    assert await broker.extend([a, b], lease=1.0) == [a, b]
    assert await broker.ack([a2, b2]) == []


async def test_a_fetch_waits_on_the_fake_clock_and_wakes_for_a_lease_that_runs_out() -> None:
    clock = FakeClock()
    broker = MemoryBroker(clock=clock)
    await broker.publish("q", [b"a"])
    (a,) = await broker.fetch("q", max_messages=1, wait=0, lease=2.0)

    waiting = asyncio.ensure_future(broker.fetch("q", max_messages=1, wait=60.0, lease=2.0))
    await clock.wait_for_sleepers(1)
    await clock.advance(1.9)
    assert not waiting.done()
    await clock.advance(0.1)  # the lease runs out: the waiting fetch gets it at once
    (again,) = await waiting
    assert (again.message_id, again.count) == (a.message_id, 2)
