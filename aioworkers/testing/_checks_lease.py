"""Conformance checks: leases (expiry, extend, fencing), release and stop_fetching."""

from __future__ import annotations

from collections.abc import Awaitable

from ..brokers.base import DeadLetterAdmin, QueueDepth
from ..errors import LeaseLost
from ._exercise import EMPTY, Exercise, bodies, check, letter


async def _lease_lost(call: Awaitable[None], what: str) -> None:
    try:
        await call
    except LeaseLost:
        return
    raise AssertionError(f"{what} of a lost lease did not raise LeaseLost")


@check()
async def check_visibility_expiry_redelivers_and_counts(ex: Exercise) -> None:
    """A delivery not settled within its lease is delivered again, counted 2, then 3."""
    broker, queue = ex.broker, ex.queue
    await broker.publish(queue, [b"crashy"])
    (d1,) = await ex.fetch_n(queue, 1, within=ex.slack + 1)
    leased = ex.now()
    assert d1.count == 1

    redelivery = ex.lease + ex.slack + 1
    (d2,) = await ex.fetch_n(queue, 1, within=redelivery)
    assert ex.now() - leased >= ex.lease - 0.05
    assert (d2.body, d2.message_id, d2.count) == (b"crashy", d1.message_id, 2)

    (d3,) = await ex.fetch_n(queue, 1, within=redelivery)
    assert (d3.body, d3.message_id, d3.count) == (b"crashy", d1.message_id, 3)
    await broker.ack([d3])
    await ex.wait_depth(queue, EMPTY)


@check()
async def check_the_lease_given_to_fetch_is_honoured(ex: Exercise) -> None:
    """``fetch(lease=...)`` sets the lease of what it hands out, whatever the broker was
    built with."""
    broker, queue, lease = ex.broker, ex.queue, 2 * ex.lease
    await broker.publish(queue, [b"leased twice as long"])
    (d1,) = await ex.fetch_n(queue, 1, within=ex.slack + 1, lease=lease)
    leased = ex.now()
    assert await ex.fetch_within(queue, within=1.5 * ex.lease) == []

    (d2,) = await ex.fetch_n(queue, 1, within=ex.lease + ex.slack + 1)
    assert ex.now() - leased >= lease - 0.05
    assert (d2.message_id, d2.count) == (d1.message_id, 2)
    await broker.ack([d2])
    await ex.wait_depth(queue, EMPTY)


@check()
async def check_extend_keeps_the_lease_past_the_visibility_timeout(ex: Exercise) -> None:
    """``extend`` keeps a delivery ours past the lease it was fetched with."""
    broker, queue, v = ex.broker, ex.queue, ex.lease
    await broker.publish(queue, [b"long job"])
    (d,) = await ex.fetch_n(queue, 1, within=ex.slack + 1)
    leased = ex.now()

    await ex.elapse(v / 2)
    assert await broker.extend([d], lease=2 * v) == []
    # Now leased until about 2.5 v after the fetch: nothing is visible well past 1 v.
    assert await ex.fetch_within(queue, within=1.2 * v) == []
    assert ex.now() - leased >= 1.5 * v
    await ex.wait_depth(queue, QueueDepth(in_flight=1))

    await broker.ack([d])
    await ex.wait_depth(queue, EMPTY)
    assert await ex.drain(queue, duration=v + ex.slack) == []


@check()
async def check_extend_sets_the_lease_from_now_and_it_runs_out(ex: Exercise) -> None:
    """An extended lease lasts ``lease`` seconds from the ``extend``, then the message is
    delivered again."""
    broker, queue, v = ex.broker, ex.queue, ex.lease
    await broker.publish(queue, [b"abandoned after a heartbeat"])
    (d,) = await ex.fetch_n(queue, 1, within=ex.slack + 1)
    await ex.elapse(v / 2)
    assert await broker.extend([d], lease=2 * v) == []
    extended = ex.now()

    (again,) = await ex.fetch_n(queue, 1, within=2 * v + ex.slack + 1)
    assert ex.now() - extended >= 2 * v - 0.05
    assert (again.message_id, again.count) == (d.message_id, 2)
    assert await broker.extend([d], lease=v) == [d]
    await broker.ack([again])
    await ex.wait_depth(queue, EMPTY)


@check()
async def check_a_stale_delivery_cannot_touch_the_new_owner(ex: Exercise) -> None:
    """Once a lease ran out and the message went to another worker, the old delivery can
    extend, retry, dead-letter, ack or release nothing (fencing)."""
    broker, queue = ex.broker, ex.queue
    await broker.publish(queue, [b"contended"])
    (stale,) = await ex.fetch_n(queue, 1, within=ex.slack + 1)
    # The lease runs out and another worker gets the message.
    (owner,) = await ex.fetch_n(queue, 1, within=ex.lease + ex.slack + 1)
    assert owner.message_id == stale.message_id
    assert owner.count == 2

    # Long enough that the owner's lease outlives the checks below.
    lost = await broker.extend([stale, owner], lease=10 * ex.lease)
    assert lost == [stale]
    assert lost[0] is stale

    await _lease_lost(broker.retry(stale, body=b"stale retry", delay=0), "retry")
    await _lease_lost(broker.dead_letter(stale, letter()), "dead_letter")
    assert await broker.ack([stale]) == [stale]  # not acked, and said so
    await broker.release([stale])

    # The owner still holds it; nothing was added, dead-lettered or made visible.
    await ex.wait_depth(queue, QueueDepth(in_flight=1))
    if isinstance(broker, DeadLetterAdmin):
        assert await broker.dead_letters(queue) == []
    assert await ex.fetch_within(queue, within=0.2) == []
    assert await broker.extend([owner], lease=ex.lease) == []

    assert await broker.ack([owner]) == []
    await ex.wait_depth(queue, EMPTY)


@check()
async def check_release_makes_deliveries_visible_at_once(ex: Exercise) -> None:
    """Released deliveries are visible again at once, and no longer ours."""
    broker, queue = ex.broker, ex.queue
    await broker.publish(queue, [b"a", b"b"])
    first = await ex.fetch_n(queue, 2, within=ex.slack + 1)
    released = ex.now()
    await broker.release(first)
    await ex.wait_depth(queue, QueueDepth(ready=2), within=ex.slack)

    again = await ex.fetch_n(queue, 2, within=ex.slack)
    assert ex.now() - released < ex.lease
    assert bodies(again) == [b"a", b"b"]
    # Same messages; a broker may hand them back under new ids (Redis re-adds the entry).
    # The released deliveries are no longer ours: settling them changes nothing.
    assert await broker.extend(first, lease=ex.lease) == first
    await broker.ack(first)
    await ex.wait_depth(queue, QueueDepth(in_flight=2))
    await broker.ack(again)
    await ex.wait_depth(queue, EMPTY)


@check()
async def check_release_does_not_count_as_a_delivery(ex: Exercise) -> None:
    """A hand-back at shutdown is not a failed attempt: it must not push a job toward
    ``max_deliveries``."""
    broker, queue = ex.broker, ex.queue
    await broker.publish(queue, [b"x"])
    for _ in range(3):
        (d,) = await ex.fetch_n(queue, 1, within=ex.slack + 1)
        assert d.count == 1
        await broker.release([d])
    (d,) = await ex.fetch_n(queue, 1, within=ex.slack + 1)
    await broker.ack([d])


@check()
async def check_stop_fetching_hands_back_nothing_fetched_and_fetch_starts_again(
    ex: Exercise,
) -> None:
    """After ``stop_fetching``, what a fetch returned stays leased to us, and what it did
    not is available to any worker, this one included."""
    broker, queue = ex.broker, ex.queue
    await broker.publish(queue, [b"held", b"waiting"])
    (held,) = await ex.fetch_n(queue, 1, within=ex.slack + 1, max_messages=1)
    await broker.stop_fetching(queue)
    assert await broker.extend([held], lease=ex.lease) == []
    (waiting,) = await ex.fetch_n(queue, 1, within=ex.slack + 1, max_messages=1)
    assert bodies([held, waiting]) == [b"held", b"waiting"]
    await broker.ack([held, waiting])
    await ex.wait_depth(queue, EMPTY)
