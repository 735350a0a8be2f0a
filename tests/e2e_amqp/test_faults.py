"""Faults with real workers on RabbitMQ: kills, closed connections, shutdown, poison,
garbage and delays. Every effect is counted in the ledger: none lost, none twice."""

from __future__ import annotations

import asyncio
import signal

from aioworkers import QueueDepth

from ..e2e.harness import check_a_poison_job_is_dead_lettered, delayed_retry_took, wait_until
from ..e2e.ledger import Snapshot
from ..services import close_amqp_connections
from .harness import AmqpE2E

EMPTY = QueueDepth()


async def test_sigkill_mid_run_loses_nothing(e2e: AmqpE2E) -> None:
    ids = await e2e.enqueue(300, seconds=0.02, task="once", track=True)
    # The idempotency claims the victim held block their jobs for one lease: keep it short.
    victim = await e2e.start_worker(concurrency=20, visibility=2)
    survivor = await e2e.start_worker(concurrency=20, visibility=2)
    await e2e.wait_done(60, within=20)
    victim.signal(signal.SIGKILL)  # mid-run: it holds running and prefetched jobs
    assert await victim.wait(10) == -signal.SIGKILL

    await e2e.wait_done(len(ids), within=30)
    ledger = await e2e.ledger()
    assert ledger.done == set(ids)
    # The key is committed one store round trip after the effect: a job the victim killed
    # in that gap runs again once its claim lapses. Only those, once more each, at most
    # one per slot of the victim; every other job of the victim is skipped or resumed.
    by_victim = set(ledger.started_by(victim.pid))
    assert set(ledger.duplicates) <= by_victim
    assert set(ledger.duplicates.values()) <= {2}
    assert len(ledger.duplicates) <= 20
    await e2e.wait_depth(EMPTY)
    assert survivor.alive


async def test_connections_closed_mid_run_every_job_finishes_and_the_consumer_returns(
    e2e: AmqpE2E,
) -> None:
    ids = await e2e.enqueue(200, seconds=0.05, task="once")
    worker = await e2e.start_worker(concurrency=10)
    await e2e.wait_done(30, within=20)
    await close_amqp_connections()

    await e2e.wait_done(len(ids), within=40)
    ledger = await e2e.ledger()
    assert ledger.done == set(ids)
    assert ledger.duplicates == {}
    await e2e.wait_depth(EMPTY)

    async def one_consumer() -> bool:
        return await e2e.consumers() == 1

    # RabbitMQ's declare-ok has been seen to count 0 for a moment while `rabbitmqctl
    # list_consumers` showed the consumer active: wait for it, bounded.
    await wait_until(one_consumer, within=5, what="one consumer on the queue")
    assert worker.alive


async def test_sigterm_hands_prefetched_jobs_to_another_worker_at_once(e2e: AmqpE2E) -> None:
    ids = await e2e.enqueue(10, seconds=6.0, track=True)
    e2e.broker_url += "?prefetch=6"  # 2 running, 4 waiting in the consumer's prefetch
    first = await e2e.start_worker(concurrency=2, grace=30)
    e2e.broker_url = e2e.broker_url.split("?")[0]

    async def running() -> bool:
        return len((await e2e.ledger()).starts) == 2

    await wait_until(running, within=20, what="the first worker's two jobs")
    await asyncio.sleep(0.3)  # its prefetch fills
    first.signal(signal.SIGTERM)
    second = await e2e.start_worker(concurrency=20)

    seen: list[Snapshot] = []

    async def taken_over() -> bool:
        seen.append(await e2e.ledger())
        return len(seen[-1].started_by(second.pid)) == 8

    await wait_until(taken_over, within=15, what="the second worker to start 8 jobs")
    # The first worker had not finished its two jobs (nor closed its connection, which
    # requeues what it holds): the other eight were handed back at once.
    assert not seen[-1].finished_by(first.pid)
    assert first.alive
    assert await first.wait(20) == 0
    await e2e.wait_done(len(ids), within=15)
    ledger = await e2e.ledger()
    assert ledger.effects == dict.fromkeys(ids, 1)
    assert len(ledger.started_by(first.pid)) == 2


async def test_a_job_that_kills_its_worker_is_dead_lettered(e2e: AmqpE2E) -> None:
    await check_a_poison_job_is_dead_lettered(e2e)


async def test_a_garbage_body_is_dead_lettered_with_a_reason(e2e: AmqpE2E) -> None:
    await e2e.app.broker.publish(e2e.queue, [b"\xff\x00 not an envelope"])
    ids = await e2e.enqueue(3)
    await e2e.start_worker(concurrency=5)
    await e2e.wait_done(3, within=20)
    dlq = e2e.app.dlq()

    async def dead() -> bool:
        return bool(await dlq.list())

    await wait_until(dead, within=10, what="the garbage in the DLQ")
    (entry,) = await dlq.list()
    assert (entry.reason, entry.task, entry.body) == (
        "decode_error",
        None,
        b"\xff\x00 not an envelope",
    )
    assert (await e2e.ledger()).done == set(ids)
    await e2e.wait_depth(QueueDepth(dead=1))


async def test_a_delayed_retry_is_honoured_within_ten_percent(e2e: AmqpE2E) -> None:
    delay = 2.0
    e2e.queues.add(f"{e2e.queue}.delay.2000.quorum")
    took = await delayed_retry_took(e2e.client(), delay)
    assert delay * 0.95 <= took <= delay * 1.1, took
