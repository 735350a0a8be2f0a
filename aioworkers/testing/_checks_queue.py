"""Conformance checks: publish, fetch, ack, delays and retries."""

from __future__ import annotations

import asyncio
import time

from ..brokers.base import DeadLetterAdmin, QueueDepth
from ._exercise import EMPTY, Exercise, bodies, check, letter


@check()
async def check_publish_fetch_ack_one(ex: Exercise) -> None:
    """A published message is ready, then in flight once fetched, then gone once acked."""
    broker, queue = ex.broker, ex.queue
    await ex.wait_depth(queue, EMPTY)
    await broker.publish(queue, [b"one"])
    await ex.wait_depth(queue, QueueDepth(ready=1))

    (d,) = await ex.fetch_n(queue, 1, within=ex.slack + 1)
    assert (d.queue, d.body, d.count) == (queue, b"one", 1)
    assert isinstance(d.message_id, str)
    assert d.message_id
    await ex.wait_depth(queue, QueueDepth(in_flight=1))

    await broker.ack([d])
    await ex.wait_depth(queue, EMPTY)
    assert await ex.fetch(queue, max_messages=10, wait=0) == []


@check()
async def check_publish_fetch_ack_batch(ex: Exercise) -> None:
    """A batch is published, fetched and acked as one; ids are distinct."""
    broker, queue = ex.broker, ex.queue
    sent = [f"job-{i}".encode() for i in range(7)]
    await broker.publish(queue, sent)
    await ex.wait_depth(queue, QueueDepth(ready=7))

    got = await ex.fetch_n(queue, 7, within=ex.slack + 2)
    assert bodies(got) == sorted(sent)
    assert len({d.message_id for d in got}) == 7
    assert all(d.count == 1 for d in got)
    await ex.wait_depth(queue, QueueDepth(in_flight=7))

    assert await broker.ack(got) == []  # all acked
    await ex.wait_depth(queue, EMPTY)


@check()
async def check_an_ack_repeated_is_harmless_and_not_a_lost_lease(ex: Exercise) -> None:
    """An ack sent again (its first reply was lost) changes nothing and reports no loss."""
    broker, queue = ex.broker, ex.queue
    await broker.publish(queue, [b"once", b"other"])
    got = await ex.fetch_n(queue, 2, within=ex.slack + 1)
    assert await broker.ack(got[:1]) == []
    assert await broker.ack(got) == []  # the first again, and the second
    await ex.wait_depth(queue, EMPTY)
    assert await ex.drain(queue, duration=ex.lease + ex.slack) == []


@check()
async def check_acked_messages_are_never_redelivered(ex: Exercise) -> None:
    """Nothing acked comes back, even after its lease would have run out."""
    broker, queue = ex.broker, ex.queue
    await broker.publish(queue, [b"a", b"b", b"c"])
    got = await ex.fetch_n(queue, 3, within=ex.slack + 1)
    await broker.ack(got)
    assert await ex.drain(queue, duration=ex.lease + ex.slack) == []
    await ex.wait_depth(queue, EMPTY)


@check()
async def check_fetch_respects_max_messages(ex: Exercise) -> None:
    """No fetch returns more than ``max_messages``."""
    broker, queue = ex.broker, ex.queue
    await broker.publish(queue, [b"%d" % i for i in range(5)])

    first = await ex.fetch_within(queue, within=ex.slack + 1, max_messages=2)
    assert 1 <= len(first) <= 2
    # Every fetch checks that it got no more than it asked for.
    rest = await ex.fetch_n(queue, 5 - len(first), within=ex.slack + 2, max_messages=2)
    got = [*first, *rest]
    assert bodies(got) == [b"0", b"1", b"2", b"3", b"4"]
    assert await ex.fetch_within(queue, within=0.1) == []
    await ex.wait_depth(queue, QueueDepth(in_flight=5))
    await broker.ack(got)


@check()
async def check_fetch_on_an_empty_queue_waits_then_returns_nothing(ex: Exercise) -> None:
    """``fetch`` on an empty queue waits about ``wait`` seconds; ``wait=0`` does not wait."""
    # Real time by nature: how long a call blocks. On a fake clock, time flows at about
    # the real pace meanwhile, so a broker may measure ``wait`` on either clock.
    wait = 0.3
    start = time.monotonic()
    async with ex.time_flows():
        assert await ex.fetch(ex.queue, max_messages=10, wait=wait) == []
    elapsed = time.monotonic() - start
    assert wait * 0.5 <= elapsed <= wait + ex.slack + 1, elapsed

    start = time.monotonic()
    assert await ex.fetch(ex.queue, max_messages=10, wait=0) == []
    assert time.monotonic() - start < ex.slack + 0.5


@check()
async def check_fetch_returns_as_soon_as_a_message_arrives(ex: Exercise) -> None:
    """A waiting ``fetch`` returns once a message is published, not when ``wait`` ends."""
    broker, queue = ex.broker, ex.queue
    start = time.monotonic()
    waiting = asyncio.create_task(ex.fetch(queue, max_messages=10, wait=10))
    await asyncio.sleep(0.1)
    await broker.publish(queue, [b"hello"])
    async with asyncio.timeout(ex.slack + 2):
        got = await waiting
    assert time.monotonic() - start < ex.slack + 2
    assert bodies(got) == [b"hello"]
    await broker.ack(got)


@check()
async def check_queues_are_independent(ex: Exercise) -> None:
    """A message published to one queue is never fetched from another."""
    broker, queue = ex.broker, ex.queue
    other = ex.case.queue()
    await broker.publish(queue, [b"mine"])
    assert await ex.fetch_within(other, within=0.1) == []
    await ex.wait_depth(other, EMPTY)
    got = await ex.fetch_n(queue, 1, within=ex.slack + 1)
    assert bodies(got) == [b"mine"]
    await broker.ack(got)


@check()
async def check_concurrent_fetches_never_hand_out_one_message_twice(ex: Exercise) -> None:
    """Four consumers fetching at once get every message exactly once between them."""
    broker, queue = ex.broker, ex.queue
    sent = [b"m%02d" % i for i in range(30)]
    await broker.publish(queue, sent)

    async def consumer() -> list[bytes]:
        got = []
        while batch := await ex.fetch_within(queue, within=0.2, max_messages=3):
            got.extend(batch)
            await asyncio.sleep(0)
        await broker.ack(got)
        return [d.body for d in got]

    results = await asyncio.gather(*(consumer() for _ in range(4)))
    everything = [b for result in results for b in result]
    assert sorted(everything) == sent
    await ex.wait_depth(queue, EMPTY)


@check()
async def check_empty_batches_are_no_ops(ex: Exercise) -> None:
    """Publishing, acking, releasing or extending nothing does nothing."""
    broker = ex.broker
    await broker.publish(ex.queue, [])
    await broker.ack([])
    await broker.release([])
    assert await broker.extend([], lease=ex.lease) == []
    await ex.wait_depth(ex.queue, EMPTY)


MALFORMED = [
    b"",
    b"\x00",
    b"\xff\xfe\xfd\x00garbage",
    bytes(range(256)),
    b"{not json",
    b'{"v": 1}',
    "snow ☃ \u2028".encode(),
    b"\r\n\t ",
    b"x" * 100_000,
]


@check()
async def check_malformed_bodies_round_trip_unchanged(ex: Exercise) -> None:
    """Any bytes come back as sent: through fetch, retry and (with ``DeadLetterAdmin``)
    the DLQ."""
    broker, queue = ex.broker, ex.queue
    await broker.publish(queue, MALFORMED)
    got = await ex.fetch_n(queue, len(MALFORMED), within=ex.slack + 2)
    assert bodies(got) == sorted(MALFORMED)
    assert all(isinstance(d.body, bytes) for d in got)

    by_body = {d.body: d for d in got}
    await broker.retry(by_body[b"\x00"], body=b"\xff\x00retried", delay=0)
    await broker.dead_letter(by_body[bytes(range(256))], letter(reason="decode_error"))
    again = await ex.fetch_n(queue, 1, within=ex.slack + 1)
    assert bodies(again) == [b"\xff\x00retried"]
    if isinstance(broker, DeadLetterAdmin):
        (dead,) = await broker.dead_letters(queue)
        assert dead.body == bytes(range(256))
    await broker.ack([d for d in got if d.body not in (b"\x00", bytes(range(256)))])
    await broker.ack(again)
    await ex.wait_depth(queue, QueueDepth(dead=1))


# -- delays and retries -----------------------------------------------------------------------


@check()
async def check_publish_with_delay_is_hidden_until_the_delay(ex: Exercise) -> None:
    """A delayed message counts as delayed and is fetched only once its delay is over."""
    broker, queue = ex.broker, ex.queue
    start = ex.now()
    await broker.publish(queue, [b"later"], delay=ex.delay)
    await broker.publish(queue, [b"now"])

    first = await ex.fetch(queue, max_messages=10, wait=0)
    assert bodies(first) == [b"now"]
    await ex.wait_depth(queue, QueueDepth(in_flight=1, delayed=1), within=ex.delay / 2)

    later = await ex.fetch_n(queue, 1, within=ex.delay + ex.slack + 1)
    assert ex.now() - start >= ex.delay - 0.05
    assert bodies(later) == [b"later"]
    assert later[0].count == 1
    await broker.ack([*first, *later])
    await ex.wait_depth(queue, EMPTY)


@check()
async def check_retry_replaces_the_message_after_the_delay(ex: Exercise) -> None:
    """``retry`` removes the delivery and makes the new body visible after ``delay``, as a
    first delivery."""
    broker, queue = ex.broker, ex.queue
    await broker.publish(queue, [b"attempt-1"])
    (old,) = await ex.fetch_n(queue, 1, within=ex.slack + 1)

    start = ex.now()
    await broker.retry(old, body=b"attempt-2", delay=ex.delay)
    assert await ex.fetch(queue, max_messages=10, wait=0) == []
    await ex.wait_depth(queue, QueueDepth(delayed=1), within=ex.delay / 2)

    (new,) = await ex.fetch_n(queue, 1, within=ex.delay + ex.slack + 1)
    assert ex.now() - start >= ex.delay - 0.05
    assert new.body == b"attempt-2"
    assert new.count == 1
    await broker.ack([new])
    # The old message is gone for good: it does not come back when its lease would expire.
    assert await ex.drain(queue, duration=ex.lease + ex.slack) == []
    await ex.wait_depth(queue, EMPTY)


@check()
async def check_retry_without_delay_is_visible_at_once(ex: Exercise) -> None:
    """``retry`` with ``delay=0`` makes the new body visible at once."""
    broker, queue = ex.broker, ex.queue
    await broker.publish(queue, [b"attempt-1"])
    (old,) = await ex.fetch_n(queue, 1, within=ex.slack + 1)
    await broker.retry(old, body=b"attempt-2", delay=0)
    got = await ex.fetch_n(queue, 1, within=ex.slack)
    assert bodies(got) == [b"attempt-2"]
    await broker.ack(got)
    await ex.wait_depth(queue, EMPTY)
