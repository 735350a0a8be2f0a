"""Faults with real workers that only RabbitMQ has: a consumer's prefetch handed back at
shutdown. (Kills, restarts, shutdown, poison, garbage and delays on every broker:
``tests/e2e_matrix``.) Every effect is counted in the ledger: none lost, none twice."""

from __future__ import annotations

import asyncio
import signal

from ..e2e.harness import wait_until
from ..e2e.ledger import Snapshot
from .harness import AmqpE2E


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
