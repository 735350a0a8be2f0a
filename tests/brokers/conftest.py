"""The broker under test for the conformance suite, and helpers that talk only to the
Broker protocol.

Adding a broker: write an async context manager that yields a `BrokerCase` (skip with
``pytest.skip`` when its server is not reachable) and add it to ``FACTORIES``. Every test
in ``test_conformance.py`` then runs against it. Tests use a fresh uuid queue name each, so
runs against a shared server don't interfere, and read ``case.visibility`` / ``case.delay``
instead of hard-coding times, so a broker with coarser timers (SQS: whole seconds) sets
larger values.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import pytest

from aioworkers import Broker, Delivery, QueueDepth
from aioworkers.brokers.memory import MemoryBroker

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


@dataclass(frozen=True)
class BrokerCase:
    """A broker instance and the timings the suite may rely on with it.

    ``visibility``: the lease a fetch grants (the broker's visibility timeout), seconds.
    ``delay``: a short publish/retry delay the broker honours.
    ``slack``: how late a broker may make a message visible (timers, polling, clock skew).
    """

    name: str
    broker: Broker
    visibility: float
    delay: float
    slack: float

    def queue(self) -> str:
        return f"conformance-{uuid.uuid4().hex}"


@asynccontextmanager
async def memory_case() -> AsyncIterator[BrokerCase]:
    # A real clock, not a fake one, so each test runs unchanged on a networked broker.
    broker = MemoryBroker(visibility_timeout=0.5)
    try:
        yield BrokerCase("memory", broker, visibility=0.5, delay=0.3, slack=0.5)
    finally:
        await broker.aclose()


@asynccontextmanager
async def redis_case() -> AsyncIterator[BrokerCase]:
    ensure(REDIS)
    from aioworkers.brokers.redis import RedisBroker

    prefix = f"test-{uuid.uuid4().hex[:12]}"
    broker = RedisBroker(f"{REDIS_URL}?prefix={prefix}", visibility_timeout=0.5)
    try:
        yield BrokerCase("redis", broker, visibility=0.5, delay=0.3, slack=0.5)
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
        yield BrokerCase("sqs", broker, visibility=2.0, delay=1.0, slack=1.5)
    finally:
        await broker.aclose()


@asynccontextmanager
async def amqp_case() -> AsyncIterator[BrokerCase]:
    ensure(RABBITMQ)
    from aioworkers.brokers.amqp import AmqpBroker

    # A prefetch above what any test holds: the suite keeps many deliveries unacked.
    broker = AmqpBroker(f"{AMQP_URL}?prefetch=100", visibility_timeout=0.5)
    try:
        yield BrokerCase("amqp", broker, visibility=0.5, delay=0.3, slack=0.5)
    finally:
        await broker.aclose()
        await delete_amqp_queues(broker.known_queues)


@asynccontextmanager
async def sqlite_case() -> AsyncIterator[BrokerCase]:
    from aioworkers.brokers.sqlite import SqliteBroker

    with tempfile.TemporaryDirectory(prefix="aioworkers-sqlite-") as directory:
        broker = SqliteBroker(f"sqlite:///{directory}/jobs.db", visibility_timeout=0.5)
        try:
            yield BrokerCase("sqlite", broker, visibility=0.5, delay=0.3, slack=0.5)
        finally:
            await broker.aclose()


FACTORIES: dict[str, Callable[[], AbstractAsyncContextManager[BrokerCase]]] = {
    "amqp": amqp_case,
    "memory": memory_case,
    "redis": redis_case,
    "sqlite": sqlite_case,
    "sqs": sqs_case,
}


@pytest.fixture(params=sorted(FACTORIES))
async def case(request: pytest.FixtureRequest) -> AsyncIterator[BrokerCase]:
    async with FACTORIES[request.param]() as broker_case:
        yield broker_case


@pytest.fixture
def broker(case: BrokerCase) -> Broker:
    return case.broker


@pytest.fixture
def queue(case: BrokerCase) -> str:
    return case.queue()


# -- helpers ----------------------------------------------------------------------------------


async def fetch_n(
    broker: Broker, queue: str, n: int, *, within: float, max_messages: int = 10
) -> list[Delivery]:
    """Fetch until ``n`` deliveries arrived or ``within`` seconds passed (a broker may hand out
    fewer than are ready in one call); never asks for more than ``n`` in all."""
    got: list[Delivery] = []
    deadline = time.monotonic() + within
    while len(got) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        want = min(max_messages, n - len(got))
        batch = await broker.fetch(queue, max_messages=want, wait=min(remaining, 1.0))
        assert len(batch) <= want, f"asked for {want}, got {len(batch)}"
        got.extend(batch)
    return got


async def drain(broker: Broker, queue: str, *, duration: float) -> list[Delivery]:
    """Fetch and ack everything that becomes visible within ``duration`` seconds."""
    got: list[Delivery] = []
    deadline = time.monotonic() + duration
    while (remaining := deadline - time.monotonic()) > 0:
        batch = await broker.fetch(queue, max_messages=10, wait=min(remaining, 0.5))
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


def bodies(deliveries: list[Delivery]) -> list[bytes]:
    """The bodies, sorted: the protocol does not promise FIFO order."""
    return sorted(d.body for d in deliveries)
