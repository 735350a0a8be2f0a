"""A worker killed while it holds jobs, seen through Redis's pending entries list: what it
held is exactly what it was running, and nothing of it is lost. (SIGKILL mid-run and a job
that kills its worker, on every broker: ``tests/e2e_matrix``.)"""

from __future__ import annotations

import signal

from aioworkers import QueueDepth

from .harness import E2E, wait_until


async def test_sigkill_loses_no_job_held_and_held_no_more_than_its_slots(e2e: E2E) -> None:
    queues = ("default", "other")
    ids: list[str] = []
    for queue in queues:
        ids += await e2e.enqueue(30, seconds=1.0, track=True, queue=queue)
    # One fetcher per queue; slots are reserved before a fetch, so the two together hold
    # no more than the concurrency, all of it running (nothing fetched and waiting).
    worker = await e2e.start_worker(concurrency=10, visibility=2.0, queues=queues)

    async def full_house() -> bool:
        held = sum([len(await e2e.held_by(worker, q)) for q in queues])
        return held == 10 and len((await e2e.ledger()).starts) == 10

    await wait_until(full_house, within=20, what="10 jobs running")
    held: set[str] = set()
    for queue in queues:
        held |= await e2e.job_ids_of(await e2e.held_by(worker, queue), queue)
    worker.signal(signal.SIGKILL)
    assert await worker.wait(10) == -signal.SIGKILL
    ledger = await e2e.ledger()
    assert held == set(ledger.started_by(worker.pid))

    finisher = await e2e.start_worker(concurrency=60, visibility=2.0, queues=queues)
    await e2e.wait_done(len(ids), within=30)
    ledger = await e2e.ledger()
    assert ledger.effects == dict.fromkeys(ids, 1)
    assert not ledger.finished_by(worker.pid)  # killed a second before its first job ended
    assert held <= set(ledger.started_by(finisher.pid))
    for queue in queues:
        await e2e.wait_depth(QueueDepth(), queue)
