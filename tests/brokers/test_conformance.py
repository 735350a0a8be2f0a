"""The broker conformance suite: what every Broker must do, checked through the protocol
methods only (and, at the end, through the public App API on that broker).

Runs once per entry of ``FACTORIES`` in ``conftest.py``. No FIFO order is assumed, and
times come from the `BrokerCase`, never from the tests.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from aioworkers import App, Broker, DeadLetter, LeaseLost, QueueDepth, current_job

from .conftest import BrokerCase, bodies, drain, fetch_n, wait_depth

EMPTY = QueueDepth()


def letter(job_id: str = "job-1", reason: str = "max_retries", attempts: int = 4) -> DeadLetter:
    return DeadLetter(
        id=job_id,
        task="send_email",
        reason=reason,
        error="ValueError: boom",
        attempts=attempts,
        error_type="ValueError",
        traceback="Traceback (most recent call last):\nValueError: boom\n",
    )


# -- publish, fetch, ack ------------------------------------------------------------------------


async def test_publish_fetch_ack_one(broker: Broker, case: BrokerCase, queue: str) -> None:
    await wait_depth(broker, queue, EMPTY)
    await broker.publish(queue, [b"one"])
    await wait_depth(broker, queue, QueueDepth(ready=1))

    (d,) = await fetch_n(broker, queue, 1, within=case.slack + 1)
    assert (d.queue, d.body, d.count) == (queue, b"one", 1)
    assert isinstance(d.message_id, str)
    assert d.message_id
    await wait_depth(broker, queue, QueueDepth(in_flight=1))

    await broker.ack([d])
    await wait_depth(broker, queue, EMPTY)
    assert await broker.fetch(queue, max_messages=10, wait=0) == []


async def test_publish_fetch_ack_batch(broker: Broker, case: BrokerCase, queue: str) -> None:
    sent = [f"job-{i}".encode() for i in range(7)]
    await broker.publish(queue, sent)
    await wait_depth(broker, queue, QueueDepth(ready=7))

    got = await fetch_n(broker, queue, 7, within=case.slack + 2)
    assert bodies(got) == sorted(sent)
    assert len({d.message_id for d in got}) == 7
    assert all(d.count == 1 for d in got)
    await wait_depth(broker, queue, QueueDepth(in_flight=7))

    assert await broker.ack(got) == []  # all acked
    await wait_depth(broker, queue, EMPTY)


async def test_an_ack_repeated_is_harmless_and_not_a_lost_lease(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    # What a retried ack looks like when the first one's reply was lost.
    await broker.publish(queue, [b"once", b"other"])
    got = await fetch_n(broker, queue, 2, within=case.slack + 1)
    assert await broker.ack(got[:1]) == []
    assert await broker.ack(got) == []  # the first again, and the second
    await wait_depth(broker, queue, EMPTY)
    assert await drain(broker, queue, duration=case.visibility + case.slack) == []


async def test_acked_messages_are_never_redelivered(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    await broker.publish(queue, [b"a", b"b", b"c"])
    got = await fetch_n(broker, queue, 3, within=case.slack + 1)
    await broker.ack(got)
    assert await drain(broker, queue, duration=case.visibility + case.slack) == []
    await wait_depth(broker, queue, EMPTY)


async def test_fetch_respects_max_messages(broker: Broker, case: BrokerCase, queue: str) -> None:
    await broker.publish(queue, [b"%d" % i for i in range(5)])

    first = await broker.fetch(queue, max_messages=2, wait=case.slack + 1)
    assert 1 <= len(first) <= 2
    # fetch_n asserts that no call returns more than it asked for.
    rest = await fetch_n(broker, queue, 5 - len(first), within=case.slack + 2, max_messages=2)
    got = [*first, *rest]
    assert bodies(got) == [b"0", b"1", b"2", b"3", b"4"]
    assert await broker.fetch(queue, max_messages=10, wait=0.1) == []
    await wait_depth(broker, queue, QueueDepth(in_flight=5))
    await broker.ack(got)


async def test_fetch_on_an_empty_queue_waits_then_returns_nothing(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    wait = 0.3
    start = time.monotonic()
    assert await broker.fetch(queue, max_messages=10, wait=wait) == []
    elapsed = time.monotonic() - start
    assert wait * 0.5 <= elapsed <= wait + case.slack + 1

    start = time.monotonic()
    assert await broker.fetch(queue, max_messages=10, wait=0) == []
    assert time.monotonic() - start < case.slack + 0.5


async def test_fetch_returns_as_soon_as_a_message_arrives(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    start = time.monotonic()
    waiting = asyncio.create_task(broker.fetch(queue, max_messages=10, wait=10))
    await asyncio.sleep(0.1)
    await broker.publish(queue, [b"hello"])
    async with asyncio.timeout(case.slack + 2):
        got = await waiting
    assert time.monotonic() - start < case.slack + 2
    assert bodies(got) == [b"hello"]
    await broker.ack(got)


async def test_queues_are_independent(broker: Broker, case: BrokerCase, queue: str) -> None:
    other = case.queue()
    await broker.publish(queue, [b"mine"])
    assert await broker.fetch(other, max_messages=10, wait=0.1) == []
    await wait_depth(broker, other, EMPTY)
    got = await fetch_n(broker, queue, 1, within=case.slack + 1)
    assert bodies(got) == [b"mine"]
    await broker.ack(got)


async def test_concurrent_fetches_never_hand_out_one_message_twice(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    sent = [b"m%02d" % i for i in range(30)]
    await broker.publish(queue, sent)

    async def consumer() -> list[bytes]:
        got = []
        while batch := await broker.fetch(queue, max_messages=3, wait=0.2):
            got.extend(batch)
            await asyncio.sleep(0)
        await broker.ack(got)
        return [d.body for d in got]

    results = await asyncio.gather(*(consumer() for _ in range(4)))
    everything = [b for result in results for b in result]
    assert sorted(everything) == sent
    await wait_depth(broker, queue, EMPTY)


async def test_empty_batches_are_no_ops(broker: Broker, case: BrokerCase, queue: str) -> None:
    await broker.publish(queue, [])
    await broker.ack([])
    await broker.release([])
    assert await broker.extend([], visibility=case.visibility) == []
    await wait_depth(broker, queue, EMPTY)


async def test_malformed_bodies_round_trip_unchanged(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    sent = [
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
    await broker.publish(queue, sent)
    got = await fetch_n(broker, queue, len(sent), within=case.slack + 2)
    assert bodies(got) == sorted(sent)
    assert all(isinstance(d.body, bytes) for d in got)

    # ... and through retry and the DLQ as well.
    by_body = {d.body: d for d in got}
    await broker.retry(by_body[b"\x00"], body=b"\xff\x00retried", delay=0)
    await broker.dead_letter(by_body[bytes(range(256))], letter(reason="decode_error"))
    again = await fetch_n(broker, queue, 1, within=case.slack + 1)
    assert bodies(again) == [b"\xff\x00retried"]
    (dead,) = await broker.dead_letters(queue)
    assert dead.body == bytes(range(256))
    await broker.ack([d for d in got if d.body not in (b"\x00", bytes(range(256)))])
    await broker.ack(again)
    await wait_depth(broker, queue, QueueDepth(dead=1))


# -- delays and retries -------------------------------------------------------------------------


async def test_publish_with_delay_is_hidden_until_the_delay(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    start = time.monotonic()
    await broker.publish(queue, [b"later"], delay=case.delay)
    await broker.publish(queue, [b"now"])

    first = await broker.fetch(queue, max_messages=10, wait=0)
    assert bodies(first) == [b"now"]
    await wait_depth(broker, queue, QueueDepth(in_flight=1, delayed=1), within=case.delay / 2)

    later = await fetch_n(broker, queue, 1, within=case.delay + case.slack + 1)
    assert time.monotonic() - start >= case.delay - 0.05
    assert bodies(later) == [b"later"]
    assert later[0].count == 1
    await broker.ack([*first, *later])
    await wait_depth(broker, queue, EMPTY)


async def test_retry_replaces_the_message_after_the_delay(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    await broker.publish(queue, [b"attempt-1"])
    (old,) = await fetch_n(broker, queue, 1, within=case.slack + 1)

    start = time.monotonic()
    await broker.retry(old, body=b"attempt-2", delay=case.delay)
    assert await broker.fetch(queue, max_messages=10, wait=0) == []
    await wait_depth(broker, queue, QueueDepth(delayed=1), within=case.delay / 2)

    (new,) = await fetch_n(broker, queue, 1, within=case.delay + case.slack + 1)
    assert time.monotonic() - start >= case.delay - 0.05
    assert new.body == b"attempt-2"
    assert new.count == 1
    await broker.ack([new])
    # The old message is gone for good: it does not come back when its lease would expire.
    assert await drain(broker, queue, duration=case.visibility + case.slack) == []
    await wait_depth(broker, queue, EMPTY)


async def test_retry_without_delay_is_visible_at_once(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    await broker.publish(queue, [b"attempt-1"])
    (old,) = await fetch_n(broker, queue, 1, within=case.slack + 1)
    await broker.retry(old, body=b"attempt-2", delay=0)
    got = await fetch_n(broker, queue, 1, within=case.slack)
    assert bodies(got) == [b"attempt-2"]
    await broker.ack(got)
    await wait_depth(broker, queue, EMPTY)


# -- leases -------------------------------------------------------------------------------------


async def test_visibility_expiry_redelivers_and_counts(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    await broker.publish(queue, [b"crashy"])
    (d1,) = await fetch_n(broker, queue, 1, within=case.slack + 1)
    leased = time.monotonic()
    assert d1.count == 1

    redelivery = case.visibility + case.slack + 1
    (d2,) = await fetch_n(broker, queue, 1, within=redelivery)
    assert time.monotonic() - leased >= case.visibility - 0.05
    assert (d2.body, d2.message_id, d2.count) == (b"crashy", d1.message_id, 2)

    (d3,) = await fetch_n(broker, queue, 1, within=redelivery)
    assert (d3.body, d3.message_id, d3.count) == (b"crashy", d1.message_id, 3)
    await broker.ack([d3])
    await wait_depth(broker, queue, EMPTY)


async def test_extend_keeps_the_lease_past_the_visibility_timeout(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    v = case.visibility
    await broker.publish(queue, [b"long job"])
    (d,) = await fetch_n(broker, queue, 1, within=case.slack + 1)
    leased = time.monotonic()

    await asyncio.sleep(v / 2)
    assert await broker.extend([d], visibility=2 * v) == []
    # Now leased until about 2.5 v after the fetch: nothing is visible well past 1 v.
    assert await broker.fetch(queue, max_messages=10, wait=1.2 * v) == []
    assert time.monotonic() - leased >= 1.5 * v
    await wait_depth(broker, queue, QueueDepth(in_flight=1))

    await broker.ack([d])
    await wait_depth(broker, queue, EMPTY)
    assert await drain(broker, queue, duration=v + case.slack) == []


async def test_a_stale_delivery_cannot_touch_the_new_owner(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    await broker.publish(queue, [b"contended"])
    (stale,) = await fetch_n(broker, queue, 1, within=case.slack + 1)
    # The lease runs out and another worker gets the message.
    (owner,) = await fetch_n(broker, queue, 1, within=case.visibility + case.slack + 1)
    assert owner.message_id == stale.message_id
    assert owner.count == 2

    # Long enough that the owner's lease outlives the checks below.
    lost = await broker.extend([stale, owner], visibility=10 * case.visibility)
    assert lost == [stale]
    assert lost[0] is stale

    with pytest.raises(LeaseLost):
        await broker.retry(stale, body=b"stale retry", delay=0)
    with pytest.raises(LeaseLost):
        await broker.dead_letter(stale, letter())
    assert await broker.ack([stale]) == [stale]  # not acked, and said so
    await broker.release([stale])

    # The owner still holds it; nothing was added, dead-lettered or made visible.
    await wait_depth(broker, queue, QueueDepth(in_flight=1))
    assert await broker.dead_letters(queue) == []
    assert await broker.fetch(queue, max_messages=10, wait=0.2) == []
    assert await broker.extend([owner], visibility=case.visibility) == []

    assert await broker.ack([owner]) == []
    await wait_depth(broker, queue, EMPTY)


async def test_release_makes_deliveries_visible_at_once(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    await broker.publish(queue, [b"a", b"b"])
    first = await fetch_n(broker, queue, 2, within=case.slack + 1)
    released = time.monotonic()
    await broker.release(first)
    await wait_depth(broker, queue, QueueDepth(ready=2), within=case.slack)

    again = await fetch_n(broker, queue, 2, within=case.slack)
    assert time.monotonic() - released < case.visibility
    assert bodies(again) == [b"a", b"b"]
    # Same messages; a broker may hand them back under new ids (Redis re-adds the entry).
    # The released deliveries are no longer ours: settling them changes nothing.
    assert await broker.extend(first, visibility=case.visibility) == first
    await broker.ack(first)
    await wait_depth(broker, queue, QueueDepth(in_flight=2))
    await broker.ack(again)
    await wait_depth(broker, queue, EMPTY)


async def test_release_does_not_count_as_a_delivery(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    # A hand-back at shutdown is not a failed attempt: it must not push a job toward
    # max_deliveries (the memory broker's reference semantics).
    await broker.publish(queue, [b"x"])
    for _ in range(3):
        (d,) = await fetch_n(broker, queue, 1, within=case.slack + 1)
        assert d.count == 1
        await broker.release([d])
    (d,) = await fetch_n(broker, queue, 1, within=case.slack + 1)
    await broker.ack([d])


# -- dead letters -------------------------------------------------------------------------------


async def test_dead_letter_stores_the_entry_and_removes_the_original(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    await broker.publish(queue, [b"poison", b"fine"])
    got = await fetch_n(broker, queue, 2, within=case.slack + 1)
    poison = next(d for d in got if d.body == b"poison")
    fine = next(d for d in got if d.body == b"fine")

    before = time.time()
    await broker.dead_letter(poison, letter())
    (entry,) = await broker.dead_letters(queue)
    assert (entry.id, entry.task, entry.reason, entry.attempts) == (
        "job-1",
        "send_email",
        "max_retries",
        4,
    )
    assert (entry.error, entry.error_type) == ("ValueError: boom", "ValueError")
    assert entry.traceback == "Traceback (most recent call last):\nValueError: boom\n"
    assert entry.body == b"poison"
    assert entry.queue == queue
    assert entry.entry_id
    assert before - 1 <= entry.dead_at <= time.time() + 1
    await wait_depth(broker, queue, QueueDepth(in_flight=1, dead=1))

    await broker.ack([fine])
    # The original is gone: its lease running out brings nothing back.
    assert await drain(broker, queue, duration=case.visibility + case.slack) == []
    await wait_depth(broker, queue, QueueDepth(dead=1))


async def test_dead_letters_list_with_limit_and_remove(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    await broker.publish(queue, [b"1", b"2", b"3"])
    got = await fetch_n(broker, queue, 3, within=case.slack + 1)
    for job_id, d in zip(["a", "b", "c"], sorted(got, key=lambda d: d.body), strict=True):
        await broker.dead_letter(d, letter(job_id))

    everything = await broker.dead_letters(queue)
    assert [e.id for e in everything] == ["a", "b", "c"]
    assert [e.body for e in everything] == [b"1", b"2", b"3"]
    assert len({e.entry_id for e in everything}) == 3
    assert [e.id for e in await broker.dead_letters(queue, limit=2)] == ["a", "b"]
    assert [e.id for e in await broker.dead_letters(queue, limit=1)] == ["a"]
    await wait_depth(broker, queue, QueueDepth(dead=3))

    other = case.queue()
    assert await broker.dead_letters(other) == []
    assert await broker.remove_dead_letters(other, None) == 0

    entry_b = everything[1].entry_id
    assert await broker.remove_dead_letters(queue, [entry_b, "no-such-entry"]) == 1
    assert await broker.remove_dead_letters(queue, [entry_b]) == 0
    assert [e.id for e in await broker.dead_letters(queue)] == ["a", "c"]
    await wait_depth(broker, queue, QueueDepth(dead=2))

    assert await broker.remove_dead_letters(queue, None) == 2
    assert await broker.dead_letters(queue) == []
    assert await broker.remove_dead_letters(queue, None) == 0
    await wait_depth(broker, queue, EMPTY)


async def test_depth_counts_every_state(broker: Broker, case: BrokerCase, queue: str) -> None:
    await wait_depth(broker, queue, EMPTY)
    await broker.publish(queue, [b"r1", b"r2", b"r3", b"r4"])
    # Long enough that they stay delayed for the whole test.
    await broker.publish(queue, [b"d1", b"d2"], delay=60)
    await wait_depth(broker, queue, QueueDepth(ready=4, delayed=2))

    got = await fetch_n(broker, queue, 2, within=case.slack + 1)
    assert all(d.body.startswith(b"r") for d in got)
    await wait_depth(broker, queue, QueueDepth(ready=2, in_flight=2, delayed=2))

    await broker.dead_letter(got[0], letter())
    await wait_depth(broker, queue, QueueDepth(ready=2, in_flight=1, delayed=2, dead=1))

    await broker.retry(got[1], body=b"r-retry", delay=60)
    await wait_depth(broker, queue, QueueDepth(ready=2, delayed=3, dead=1))


# -- the public App API on this broker -----------------------------------------------------------


def make_app(case: BrokerCase, queue: str) -> App:
    return App(case.broker, queue=queue, visibility_timeout=case.visibility)


async def run_burst(app: App) -> dict[str, int]:
    worker = app.worker(concurrency=5, poll=0.1)
    async with asyncio.timeout(10):
        await worker.run(burst=True)
    return worker.counts


async def test_app_runs_every_job_exactly_once(case: BrokerCase, queue: str) -> None:
    app = make_app(case, queue)
    seen: list[tuple[str, int, int]] = []

    @app.task
    async def record(n: int) -> None:
        job = current_job()
        seen.append((job.id, job.attempt, n))
        await asyncio.sleep(0.01)

    ids = [await record.enqueue(i) for i in range(10)]
    ids += await app.enqueue_many([record.call(i) for i in range(10, 20)])
    assert len(set(ids)) == 20

    assert await run_burst(app) == {"ok": 20}
    assert sorted(n for _, _, n in seen) == list(range(20))
    assert sorted(job_id for job_id, _, _ in seen) == sorted(ids)
    assert all(attempt == 1 for _, attempt, _ in seen)
    await wait_depth(case.broker, queue, EMPTY)


async def test_app_dead_letters_undecodable_messages_and_runs_the_rest(
    case: BrokerCase, queue: str
) -> None:
    app = make_app(case, queue)
    seen: list[int] = []

    @app.task
    async def record(n: int) -> None:
        seen.append(n)

    garbage = b"\xff\x00 not an envelope"
    await case.broker.publish(queue, [garbage])
    for n in range(3):
        await record.enqueue(n)
    await case.broker.publish(queue, [b"[1, 2]"])
    unknown_id = await app.enqueue("no_such_task", args=[1])

    assert await run_burst(app) == {"ok": 3, "dead": 3}
    assert sorted(seen) == [0, 1, 2]

    dead = {e.reason: e for e in await app.dlq().list()}
    assert sorted(dead) == ["decode_error", "schema_error", "unknown_task"]
    assert (dead["decode_error"].body, dead["decode_error"].task) == (garbage, None)
    assert dead["decode_error"].attempts == 1
    assert dead["decode_error"].error_type == "DecodeError"
    assert dead["schema_error"].body == b"[1, 2]"
    assert (dead["unknown_task"].id, dead["unknown_task"].task) == (unknown_id, "no_such_task")
    await wait_depth(case.broker, queue, QueueDepth(dead=3))


async def test_app_dlq_replay_reruns_as_attempt_one_and_purge_empties(
    case: BrokerCase, queue: str
) -> None:
    app = make_app(case, queue)
    failing = True
    runs: list[tuple[str, int]] = []

    @app.task(retries=1, backoff=0)
    async def flaky(n: int) -> None:
        job = current_job()
        runs.append((job.id, job.attempt))
        if failing:
            raise RuntimeError("cannot reach redis://app:s3cret@cache:6379")

    first = await flaky.enqueue(1)
    second = await flaky.enqueue(2)
    assert await run_burst(app) == {"retried": 2, "dead": 2}
    assert sorted(runs) == sorted([(first, 1), (first, 2), (second, 1), (second, 2)])

    entries = {e.id: e for e in await app.dlq().list()}
    assert sorted(entries) == sorted([first, second])
    entry = entries[first]
    assert (entry.task, entry.reason, entry.attempts) == ("flaky", "max_retries", 2)
    assert entry.error == "RuntimeError: cannot reach redis://app:***@cache:6379"
    assert entry.error_type == "RuntimeError"
    assert entry.traceback is not None
    assert "s3cret" not in entry.traceback

    failing = False
    runs.clear()
    assert await app.dlq().replay([first]) == 1
    assert [e.id for e in await app.dlq().list()] == [second]
    assert await run_burst(app) == {"ok": 1}
    assert runs == [(first, 1)]

    assert await app.dlq().purge() == 1
    assert await app.dlq().list() == []
    assert await app.dlq().purge() == 0
    await wait_depth(case.broker, queue, EMPTY)


async def test_app_dlq_replay_all(case: BrokerCase, queue: str) -> None:
    app = make_app(case, queue)
    failing = True
    runs: list[tuple[int, int]] = []

    @app.task(retries=0)
    async def flaky(n: int) -> None:
        runs.append((n, current_job().attempt))
        if failing:
            raise ValueError(n)

    await app.enqueue_many([flaky.call(n) for n in range(3)])
    assert await run_burst(app) == {"dead": 3}
    await wait_depth(case.broker, queue, QueueDepth(dead=3))

    failing = False
    runs.clear()
    assert await app.dlq().replay() == 3
    await wait_depth(case.broker, queue, QueueDepth(ready=3))
    assert await run_burst(app) == {"ok": 3}
    assert sorted(runs) == [(0, 1), (1, 1), (2, 1)]
    assert await app.dlq().replay() == 0
    await wait_depth(case.broker, queue, EMPTY)


async def test_stop_fetching_hands_back_nothing_fetched_and_fetch_starts_again(
    broker: Broker, case: BrokerCase, queue: str
) -> None:
    await broker.publish(queue, [b"held", b"waiting"])
    (held,) = await fetch_n(broker, queue, 1, within=case.slack + 1, max_messages=1)
    await broker.stop_fetching(queue)
    # What fetch returned stays ours; what it did not is available to any worker.
    assert await broker.extend([held], visibility=case.visibility) == []
    (waiting,) = await fetch_n(broker, queue, 1, within=case.slack + 1, max_messages=1)
    assert bodies([held, waiting]) == [b"held", b"waiting"]
    await broker.ack([held, waiting])
    await wait_depth(broker, queue, EMPTY)
