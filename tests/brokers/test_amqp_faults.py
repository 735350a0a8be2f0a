"""RabbitMQ faults the review suspected by reading (issue #11), each shown on the real
server: bad headers in a message, dead-lettering of delays, resource alarms, and the
mapping of client errors."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import aio_pika
import pytest

from aioworkers import QueueDepth
from aioworkers.brokers.amqp import COUNT, AmqpBroker

from ..services import AMQP_URL, RABBITMQ, delete_amqp_queues, ensure
from .conftest import fetch_n, wait_depth

Make = Callable[..., AmqpBroker]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    ensure(RABBITMQ)
    brokers: list[AmqpBroker] = []

    def make(query: str = "prefetch=100", visibility: float = 30.0) -> AmqpBroker:
        broker = AmqpBroker(f"{AMQP_URL}?{query}", visibility_timeout=visibility)
        brokers.append(broker)
        return broker

    try:
        yield make
    finally:
        names: set[str] = set()
        for broker in brokers:
            await broker.aclose()
            names |= broker.known_queues
        await delete_amqp_queues(names)


@pytest.fixture
def queue() -> str:
    return f"amqp-faults-{uuid.uuid4().hex}"


async def publish_raw(queue: str, body: bytes, headers: dict[str, Any]) -> str:
    """Publish as another client would (aio-pika, not this broker); returns the message id."""
    message_id = uuid.uuid4().hex
    conn = await aio_pika.connect(AMQP_URL)
    async with conn:
        channel = await conn.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(body, headers=headers, message_id=message_id), routing_key=queue
        )
    return message_id


async def redeliver_raw(queue: str) -> None:
    """Take one message with a raw consumer and close the channel unacked: RabbitMQ
    requeues it marked ``redelivered``."""
    conn = await aio_pika.connect(AMQP_URL)
    async with conn:
        channel = await conn.channel()
        q = await channel.get_queue(queue, ensure=False)
        message = await q.get(timeout=5, fail=True)
        assert message is not None
        await channel.close()


async def dead_within(broker: AmqpBroker, queue: str, within: float = 5.0) -> list[Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        letters = await broker.dead_letters(queue)
        if letters:
            return letters
        await asyncio.sleep(0.05)
    return []


# -- bad headers ----------------------------------------------------------------------------

BAD_COUNTS = [
    pytest.param("garbage", id="text"),
    pytest.param(bytearray(b"\xff\xfe"), id="bytes"),
    pytest.param(Decimal("1.5"), id="decimal"),
    pytest.param({"a": 1}, id="table"),
    pytest.param(None, id="void"),
    pytest.param(-1000, id="negative"),
    pytest.param(1.5, id="float"),
    pytest.param(True, id="bool"),
    pytest.param([1, 2], id="list"),
    pytest.param("9" * 5000, id="5000-digits"),
    pytest.param(2**62, id="huge"),
]


@pytest.mark.parametrize("value", BAD_COUNTS)
async def test_a_bad_delivery_count_header_is_dead_lettered_never_raised_from_fetch(
    make: Make, queue: str, value: Any
) -> None:
    broker = make()
    assert await broker.fetch(queue, max_messages=10, wait=0) == []  # declared, consuming
    bad_id = await publish_raw(queue, b"body", {COUNT: value})
    await broker.publish(queue, [b"good"])

    # Before: fetch raised ValueError/TypeError (the message left taken, never settled),
    # or handed a negative count out (a poison job that never reaches its limit).
    got = await fetch_n(broker, queue, 1, within=3)
    assert [d.body for d in got] == [b"good"]
    await broker.ack(got)
    (letter,) = await dead_within(broker, queue)
    assert (letter.id, letter.reason, letter.task, letter.body) == (
        bad_id,
        "schema_error",
        None,
        b"body",
    )
    assert letter.error is not None
    assert COUNT in letter.error
    assert len(letter.error) < 300
    await wait_depth(broker, queue, QueueDepth(dead=1))


async def test_a_bad_count_on_a_redelivered_message_is_dead_lettered(
    make: Make, queue: str
) -> None:
    broker = make()
    await broker._ensure(queue)
    bad_id = await publish_raw(queue, b"body", {COUNT: "x"})
    await redeliver_raw(queue)  # comes back `redelivered`: the recount path
    assert await broker.fetch(queue, max_messages=10, wait=0.5) == []
    (letter,) = await dead_within(broker, queue)
    assert (letter.id, letter.reason) == (bad_id, "schema_error")
    await wait_depth(broker, queue, QueueDepth(dead=1))


async def test_a_bad_x_delivery_count_on_a_quorum_queue_is_dead_lettered(
    make: Make, queue: str
) -> None:
    broker = make("queue_type=quorum&prefetch=10")
    assert await broker.fetch(queue, max_messages=10, wait=0) == []
    bad_id = await publish_raw(queue, b"body", {"x-delivery-count": "lots"})
    assert await broker.fetch(queue, max_messages=10, wait=0.5) == []
    (letter,) = await dead_within(broker, queue)
    assert (letter.id, letter.reason) == (bad_id, "schema_error")
    await wait_depth(broker, queue, QueueDepth(dead=1))


async def test_a_good_count_header_from_another_client_is_counted(make: Make, queue: str) -> None:
    broker = make()
    assert await broker.fetch(queue, max_messages=10, wait=0) == []
    await publish_raw(queue, b"body", {COUNT: 4})
    (d,) = await fetch_n(broker, queue, 1, within=3)
    assert d.count == 5
    await broker.ack([d])


async def test_a_dlq_entry_with_bad_numbers_from_another_client_is_still_listed(
    make: Make, queue: str
) -> None:
    broker = make()
    await broker._ensure(queue)
    await publish_raw(
        f"{queue}.dead", b"body", {"reason": "rejected", "attempts": "many", "dead_at": "nan"}
    )
    (letter,) = await broker.dead_letters(queue)  # raised ValueError before
    assert (letter.reason, letter.attempts, letter.body) == ("rejected", 1, b"body")
    assert await broker.remove_dead_letters(queue, None) == 1
