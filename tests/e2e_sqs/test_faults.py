"""Workers on sqs:// (moto) that hold long jobs, and meet message attributes no producer of
ours wrote. (Kills, restarts, shutdown, poison, garbage and delays on every broker:
``tests/e2e_matrix``.)"""

from __future__ import annotations

import signal

from aioworkers import QueueDepth

from ..e2e.harness import wait_until
from .conftest import SqsE2E


async def test_a_long_job_with_heartbeats_is_not_redelivered(e2e: SqsE2E) -> None:
    # Three leases long: only the heartbeat (extend every visibility / 3) keeps it.
    ids = await e2e.enqueue(3, seconds=6.0, track=True)
    workers = [
        await e2e.start_worker(concurrency=5, visibility=2.0),
        await e2e.start_worker(concurrency=5, visibility=2.0),
    ]
    await e2e.wait_done(3, within=30)
    ledger = await e2e.ledger()
    assert sorted(job_id for job_id, _ in ledger.starts) == sorted(ids)  # each started once
    assert ledger.duplicates == {}
    await e2e.wait_depth(QueueDepth(), within=10)
    for w in workers:
        w.signal(signal.SIGTERM)
    for w in workers:
        assert await w.wait(20) == 0


async def test_unreadable_attributes_are_dead_lettered_and_the_worker_lives(e2e: SqsE2E) -> None:
    # Before: an aw-eta that is no number raised out of fetch and stopped the worker for
    # good; an aw-base of -100 made a job that kills its worker look delivered -99 times,
    # so max_deliveries never caught it.
    from aioworkers.brokers.sqs import SqsBroker
    from aioworkers.envelope import Envelope, encode

    ids = await e2e.enqueue(5)
    broker = e2e.app.broker
    assert isinstance(broker, SqsBroker)
    client = await broker.client()
    url = (await client.get_queue_url(QueueName=broker.sqs_name("default")))["QueueUrl"]
    poison = encode(Envelope(id="poison", task="die", args=[], kwargs={}))
    for body, name, kind, value in [
        (poison.decode(), "aw-base", "Number", "-100"),
        ("{}", "aw-eta", "String", "soon"),
    ]:
        attributes = {name: {"DataType": kind, "StringValue": value}}
        await client.send_message(QueueUrl=url, MessageBody=body, MessageAttributes=attributes)
    worker = await e2e.start_worker(concurrency=5, visibility=2.0, max_deliveries=1)

    async def both_dead() -> bool:
        e2e.check_workers()  # the poison job never runs, so nothing dies
        return (await e2e.depth()).dead == 2

    await wait_until(both_dead, within=20, what="2 dead letters")
    await e2e.wait_done(5, within=20)
    assert (await e2e.ledger()).done == set(ids)
    dead = sorted(await e2e.app.dlq().list(), key=lambda e: e.error or "")
    assert [e.reason for e in dead] == ["schema_error", "schema_error"]
    assert "aw-base" in (dead[0].error or "")
    assert "aw-eta" in (dead[1].error or "")
    assert dead[0].body == poison
    await e2e.wait_depth(QueueDepth(dead=2), within=10)
    worker.signal(signal.SIGTERM)
    assert await worker.wait(20) == 0
