"""RabbitMQ specifics the conformance suite cannot see: declaration conflicts, channels
that close under a delivery, reconnects, the prefetch handed back, delivery counting."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import aiormq
import pytest

from aioworkers import BrokerUnavailable, ConfigError, LeaseLost, QueueDepth
from aioworkers.brokers.amqp import AmqpBroker

from ..services import AMQP_URL, RABBITMQ, close_amqp_connections, delete_amqp_queues, ensure
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
    return f"amqp-test-{uuid.uuid4().hex}"


async def consumers(queue: str) -> int:
    conn = await aiormq.connect(AMQP_URL)
    try:
        ok = await (await conn.channel()).queue_declare(queue, passive=True)
        return int(ok.consumer_count or 0)
    finally:
        await conn.close()


async def test_a_queue_declared_with_other_arguments_is_one_clear_error(
    make: Make, queue: str
) -> None:
    quorum = make("queue_type=quorum")
    await quorum.publish(queue, [b"x"])
    classic = make()
    with pytest.raises(ConfigError) as info:
        await classic.publish(queue, [b"y"])
    message = str(info.value)
    assert "\n" not in message
    assert f"queue {queue!r} already exists with other arguments" in message
    assert "queue_type=" in message
    assert "guest" not in message
    # The broker is still usable once the conflict is gone.
    (d,) = await fetch_n(quorum, queue, 1, within=2)
    await quorum.ack([d])


async def test_bad_url_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="queue_type"):
        AmqpBroker("amqp://127.0.0.1/?queue_type=stream")
    with pytest.raises(ConfigError, match="prefetch"):
        AmqpBroker("amqp://127.0.0.1/?prefetch=lots")


async def test_deliveries_of_a_closed_channel_are_dropped_not_acked_on_the_new_one(
    make: Make, queue: str
) -> None:
    broker = make()
    await broker.publish(queue, [b"job"])
    (old,) = await fetch_n(broker, queue, 1, within=2)
    assert broker._con is not None
    await broker._con.close()  # as if RabbitMQ closed it (consumer_timeout, an error)

    # RabbitMQ requeued it; the next fetch rebuilds the channel and the consumer.
    (new,) = await fetch_n(broker, queue, 1, within=3)
    assert (new.body, new.message_id, new.count) == (b"job", old.message_id, 2)

    # The stale delivery is never acked (its tag means another message on the new channel,
    # or closes it): ack and release do nothing, extend reports it, retry refuses.
    assert await broker.ack([old]) == [old]
    await broker.release([old])
    assert await broker.extend([old, new], lease=30) == [old]
    with pytest.raises(LeaseLost):
        await broker.retry(old, body=b"again", delay=0)
    assert broker._con is not None
    assert not broker._con.is_closed
    await wait_depth(broker, queue, QueueDepth(in_flight=1))
    await broker.ack([new])
    await wait_depth(broker, queue, QueueDepth())


async def test_consumer_count_comes_back_after_rabbitmq_closes_every_connection(
    make: Make, queue: str
) -> None:
    broker = make()
    assert await broker.fetch(queue, max_messages=10, wait=0) == []
    assert await consumers(queue) == 1

    before = broker._consumers[queue]
    await close_amqp_connections()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            await broker.fetch(queue, max_messages=10, wait=0.2)
        except BrokerUnavailable:  # the loss is reported; the next fetch rebuilds
            await asyncio.sleep(0.1)
            continue
        if broker._live(broker._consumers.get(queue)):
            break
    after = broker._consumers[queue]
    assert after is not before
    assert after.tag != before.tag  # a new consumer on a new channel
    assert await consumers(queue) == 1

    await broker.publish(queue, [b"after"])
    (d,) = await fetch_n(broker, queue, 1, within=2)
    assert d.body == b"after"
    await broker.ack([d])


async def test_stop_fetching_hands_the_prefetch_to_another_worker_at_once(
    make: Make, queue: str
) -> None:
    first, second = make("prefetch=10"), make("prefetch=10")
    await first.publish(queue, [b"%d" % i for i in range(5)])
    (held,) = await fetch_n(first, queue, 1, within=2, max_messages=1)
    await wait_depth(first, queue, QueueDepth(ready=4, in_flight=1))
    # The other four sit in the first worker's prefetch: nobody else can have them...
    assert await second.fetch(queue, max_messages=10, wait=0.3) == []

    await first.stop_fetching(queue)
    start = time.monotonic()
    got = await fetch_n(second, queue, 4, within=2)
    assert time.monotonic() - start < 1.5
    assert sorted(d.body for d in got) == [b"%d" % i for i in range(5) if b"%d" % i != held.body]
    assert all(d.count == 1 for d in got)  # handed back, not counted as a delivery
    assert await first.extend([held], lease=30) == []
    await first.ack([held])
    await second.ack(got)
    await wait_depth(second, queue, QueueDepth())


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_the_oldest_acks_go_in_one_frame_that_never_covers_a_held_delivery(
    make: Make, queue: str, queue_type: str
) -> None:
    broker = make(f"queue_type={queue_type}&prefetch=10")
    await broker.publish(queue, [b"%d" % i for i in range(6)])
    got = await fetch_n(broker, queue, 6, within=3)
    assert [d.body for d in got] == [b"%d" % i for i in range(6)]
    ch = broker._con
    assert ch is not None
    frames: list[tuple[int, bool]] = []
    basic_ack = ch.basic_ack

    async def spy(delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        frames.append((delivery_tag, multiple))
        await basic_ack(delivery_tag, multiple=multiple, wait=wait)

    ch.basic_ack = spy  # type: ignore[method-assign]
    tags = [d.token.message.delivery_tag for d in got]  # type: ignore[union-attr]

    assert await broker.ack([got[2], got[0], got[1]]) == []
    assert frames == [(tags[2], True)]  # the three oldest: one frame
    frames.clear()
    assert await broker.ack([got[4], got[5]]) == []  # 3 is still held: one frame each
    assert frames == [(tags[4], False), (tags[5], False)]
    await wait_depth(broker, queue, QueueDepth(in_flight=1))

    # Nothing but the held one was left unacked: a dead channel hands back only it.
    await ch.close()
    (again,) = await fetch_n(broker, queue, 1, within=3)
    assert (again.body, again.count) == (b"3", 2)
    await broker.ack([again])
    await wait_depth(broker, queue, QueueDepth())


async def test_an_ack_batch_leaves_out_a_delivery_whose_lease_was_lost_meanwhile(
    make: Make, queue: str
) -> None:
    broker = make()
    await broker.publish(queue, [b"0", b"1", b"2"])
    got = await fetch_n(broker, queue, 3, within=3)
    m0, m1, m2 = (d.token.message for d in got)  # type: ignore[union-attr]
    consumers = broker._consumers_of
    # Its lease ran out while the batch waited: it is nacked by the lease's own path, and
    # no frame of the batch (a multiple one least of all) may cover it.
    held = {id(d.token.message): d.token for d in got}  # type: ignore[union-attr]

    def claim(message: object) -> bool:
        return message is not m1 and broker._leases.settle(held[id(message)])

    refused, written = await consumers.ack_many([m0, m1, m2], broker._gen, claim)
    assert (refused, written) == ([m1], True)
    assert broker._leases.settle(held[id(m1)])
    assert await consumers.settle(m1, broker._gen, requeue=True)
    (again,) = await fetch_n(broker, queue, 1, within=3)
    assert (again.body, again.count) == (b"1", 2)
    await broker.ack([again])
    await wait_depth(broker, queue, QueueDepth())


async def test_an_expired_lease_whose_nack_was_not_queued_is_handed_back_later(
    make: Make, queue: str
) -> None:
    broker = make()
    await broker.publish(queue, [b"job"])
    (d,) = await fetch_n(broker, queue, 1, within=3)
    consumers = broker._consumers_of
    ready = consumers._ready
    stalled = asyncio.Event()

    async def stall(gen: int) -> object:
        stalled.set()
        await asyncio.Event().wait()  # a write queue that never drains
        return None

    consumers._ready = stall  # type: ignore[method-assign]
    broker._leases.add(d.token, -1.0)  # its lease ran out
    expiring = asyncio.create_task(broker._expire())
    await stalled.wait()
    expiring.cancel()  # as a fetch cancelled at shutdown would be
    with pytest.raises(asyncio.CancelledError):
        await expiring
    # Its nack was never queued: it keeps a lease, and is nacked once that runs out.
    assert broker._leases.owns(d.token)
    consumers._ready = ready  # type: ignore[method-assign]
    # Real time: the broker's own retry delay (EXPIRE_AGAIN, 1 s) is what is under test.
    (again,) = await fetch_n(broker, queue, 1, within=5)
    assert (again.body, again.message_id) == (b"job", d.message_id)
    await broker.ack([again])
    await wait_depth(broker, queue, QueueDepth())


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_the_delivery_count_grows_each_time_a_worker_dies_holding_it(
    make: Make, queue: str, queue_type: str
) -> None:
    for expected in (1, 2, 3):
        worker = make(f"queue_type={queue_type}&prefetch=10")
        if expected == 1:
            await worker.publish(queue, [b"poison"])
        (d,) = await fetch_n(worker, queue, 1, within=3)
        assert (d.body, d.count) == (b"poison", expected)
        # The process dies: its connection goes, RabbitMQ requeues what it held.
        assert worker._conn is not None
        await worker._conn.close()
    survivor = make(f"queue_type={queue_type}&prefetch=10")
    (d,) = await fetch_n(survivor, queue, 1, within=3)
    assert d.count == 4
    await survivor.release([d])  # a hand-back does not count
    (d,) = await fetch_n(survivor, queue, 1, within=3)
    assert d.count == 4
    await survivor.ack([d])


async def test_a_delay_is_honoured_within_ten_percent(make: Make, queue: str) -> None:
    broker = make()
    delay = 1.5
    start = time.monotonic()
    await broker.publish(queue, [b"later"], delay=delay)
    (d,) = await fetch_n(broker, queue, 1, within=delay * 2)
    took = time.monotonic() - start
    assert delay * 0.95 <= took <= delay * 1.1, took
    assert f"{queue}.delay.1500.quorum" in broker.known_queues
    await broker.ack([d])
