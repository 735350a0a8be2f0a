"""The brokers under test for the conformance suite (`aioworkers.testing.conformance`,
run on each of them by ``test_conformance.py``), and helpers for the broker-specific tests
that talk only to the Broker protocol.

Adding a broker: write an async context manager that yields a `BrokerCase` (skip with
``pytest.skip`` when its server is not reachable) and a few lines in
``test_conformance.py``. Each check uses a fresh uuid queue name, so runs against a
shared server don't interfere, and reads its timings from the case, so a broker with
coarser timers (SQS: whole seconds) sets larger values.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aioworkers import Broker, Delivery, QueueDepth
from aioworkers.brokers.base import DEFAULT_LEASE, ConfiguredLease
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.testing import FakeClock
from aioworkers.testing.conformance import BrokerCase, bodies

from ..services import (
    AMQP_URL,
    RABBITMQ,
    REDIS,
    REDIS_URL,
    delete_amqp_queues,
    delete_prefix,
    ensure,
    moto_endpoint,
    sqs_url,
)

__all__ = ["REDIS_URL", "BrokerCase", "bodies", "delete_prefix", "drain", "fetch_n", "wait_depth"]


@asynccontextmanager
async def memory_case() -> AsyncIterator[BrokerCase]:
    # A real clock, as a networked broker has: the suite's real-time path.
    broker = MemoryBroker(visibility_timeout=0.5)
    try:
        yield BrokerCase(broker, lease=0.5, delay=0.3, slack=0.5, name="memory")
    finally:
        await broker.aclose()


@asynccontextmanager
async def memory_fake_clock_case() -> AsyncIterator[BrokerCase]:
    # The suite's fake-clock path: long leases and delays cost no real time.
    clock = FakeClock()
    broker = MemoryBroker(visibility_timeout=30.0, clock=clock)
    try:
        yield BrokerCase(broker, lease=30.0, delay=5.0, slack=0.0, clock=clock, name="memory")
    finally:
        await broker.aclose()


@asynccontextmanager
async def redis_case() -> AsyncIterator[BrokerCase]:
    ensure(REDIS)
    from aioworkers.brokers.redis import RedisBroker

    prefix = f"test-{uuid.uuid4().hex[:12]}"
    broker = RedisBroker(f"{REDIS_URL}?prefix={prefix}", visibility_timeout=0.5)
    try:
        yield BrokerCase(broker, lease=0.5, delay=0.3, slack=0.5, name="redis")
    finally:
        await broker.aclose()
        await delete_prefix(prefix)


@asynccontextmanager
async def sqs_case() -> AsyncIterator[BrokerCase]:
    endpoint = moto_endpoint()
    from aioworkers.brokers.sqs import SqsBroker

    # SQS counts in whole seconds, and moto's long poll notices a lapsed lease only on its
    # once-a-second recheck: a lease of 2 s and a slack of 1.5 s.
    broker = SqsBroker(sqs_url(endpoint), visibility_timeout=2.0)
    try:
        yield BrokerCase(broker, lease=2.0, delay=1.0, slack=1.5, name="sqs")
    finally:
        await broker.aclose()


@asynccontextmanager
async def amqp_case() -> AsyncIterator[BrokerCase]:
    ensure(RABBITMQ)
    from aioworkers.brokers.amqp import AmqpBroker

    # A prefetch above what any test holds: the suite keeps many deliveries unacked.
    broker = AmqpBroker(f"{AMQP_URL}?prefetch=100", visibility_timeout=0.5)
    try:
        yield BrokerCase(broker, lease=0.5, delay=0.3, slack=0.5, name="amqp")
    finally:
        await broker.aclose()
        await delete_amqp_queues(broker.known_queues)


@asynccontextmanager
async def sqlite_case() -> AsyncIterator[BrokerCase]:
    from aioworkers.brokers.sqlite import SqliteBroker

    with tempfile.TemporaryDirectory(prefix="aioworkers-sqlite-") as directory:
        broker = SqliteBroker(f"sqlite:///{directory}/jobs.db", visibility_timeout=0.5)
        try:
            yield BrokerCase(broker, lease=0.5, delay=0.3, slack=0.5, name="sqlite")
        finally:
            await broker.aclose()


# -- helpers ----------------------------------------------------------------------------------


def default_lease(broker: Broker) -> float:
    """The lease these helpers ask for unless told: the one the broker was built with."""
    lease = broker.visibility_timeout if isinstance(broker, ConfiguredLease) else None
    return DEFAULT_LEASE if lease is None else float(lease)


async def fetch_n(
    broker: Broker,
    queue: str,
    n: int,
    *,
    within: float,
    max_messages: int = 10,
    lease: float | None = None,
) -> list[Delivery]:
    """Fetch until ``n`` deliveries arrived or ``within`` seconds passed (a broker may hand out
    fewer than are ready in one call); never asks for more than ``n`` in all."""
    lease = default_lease(broker) if lease is None else lease
    got: list[Delivery] = []
    deadline = time.monotonic() + within
    while len(got) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        want = min(max_messages, n - len(got))
        batch = await broker.fetch(queue, max_messages=want, wait=min(remaining, 1.0), lease=lease)
        assert len(batch) <= want, f"asked for {want}, got {len(batch)}"
        got.extend(batch)
    return got


async def drain(
    broker: Broker, queue: str, *, duration: float, lease: float | None = None
) -> list[Delivery]:
    """Fetch and ack everything that becomes visible within ``duration`` seconds."""
    lease = default_lease(broker) if lease is None else lease
    got: list[Delivery] = []
    deadline = time.monotonic() + duration
    while (remaining := deadline - time.monotonic()) > 0:
        batch = await broker.fetch(queue, max_messages=10, wait=min(remaining, 0.5), lease=lease)
        if batch:
            await broker.ack(batch)
            got.extend(batch)
    return got


async def wait_depth(
    broker: Broker, queue: str, expected: QueueDepth, *, within: float = 2.0
) -> None:
    """Assert that ``depth`` reaches ``expected`` within ``within`` seconds (some brokers report
    depth approximately and late); fails with the last value seen."""
    deadline = time.monotonic() + within
    while True:
        depth = await broker.depth(queue)
        if depth == expected or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)
    assert depth == expected


@asynccontextmanager
async def postgres_case() -> AsyncIterator[BrokerCase]:
    from aioworkers.brokers.postgres import PostgresBroker

    from ..services import postgres_database

    async with postgres_database() as url:
        # A short poll: the suite's leases and delays are short, and an idle fetch finds a
        # lapsed lease or a due delay by polling.
        broker = PostgresBroker(f"{url}?poll=0.1", visibility_timeout=0.5)
        await broker.migrate()
        try:
            yield BrokerCase(broker, lease=0.5, delay=0.3, slack=0.5, name="postgres")
        finally:
            await broker.aclose()
