"""SIGTERM with jobs running and jobs fetched but not started."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from aioworkers import QueueDepth

from .harness import E2E, wait_until

QUEUES = ("default", "other")
CONCURRENCY = 5
JOB_SECONDS = 2.0
# Far longer than the test: a job that is not released comes back only after this.
VISIBILITY = 60.0


@pytest.mark.parametrize("signals", [1, 2], ids=["drain", "stop-now"])
async def test_sigterm_finishes_or_releases_jobs_and_another_worker_takes_them_at_once(
    e2e: E2E, signals: int
) -> None:
    ids: list[str] = []
    for queue in QUEUES:
        ids += await e2e.enqueue(25, seconds=JOB_SECONDS, track=True, queue=queue)
    first = await e2e.start_worker(
        concurrency=CONCURRENCY, visibility=VISIBILITY, queues=QUEUES, grace=30
    )

    # One fetcher per queue; slots are reserved before a fetch, so together they hold no
    # more than the concurrency, all of it running.
    async def full_house() -> bool:
        pending = sum([len(await e2e.pending(q)) for q in QUEUES])
        return pending == CONCURRENCY and len((await e2e.ledger()).starts) == CONCURRENCY

    await wait_until(full_house, within=JOB_SECONDS / 2 + 10, what="running + fetched jobs")
    running = set((await e2e.ledger()).started_by(first.pid))
    first.signal(signal.SIGTERM)
    if signals == 2:
        await asyncio.sleep(0.2)
        first.signal(signal.SIGTERM)  # stop now: cancel the running jobs and release them
    assert await first.wait(JOB_SECONDS + 15) == 0
    exited = time.monotonic()
    for queue in QUEUES:
        assert (await e2e.depth(queue)).in_flight == 0  # nothing left leased to it

    second = await e2e.start_worker(concurrency=50, visibility=VISIBILITY, queues=QUEUES, grace=30)
    await e2e.wait_done(len(ids), within=20)
    took = time.monotonic() - exited
    assert took < VISIBILITY / 4  # picked up at once, not after their leases ran out

    ledger = await e2e.ledger()
    assert ledger.done == set(ids)
    assert ledger.effects == dict.fromkeys(ids, 1)
    log = first.log()
    if signals == 1:
        # The running jobs finished on the first worker, which held no others.
        assert ledger.finished_by(first.pid) == running
        assert "ok=5 retried=0 dead=0 released=0 lease_lost=0" in log
        assert sorted(job_id for job_id, _ in ledger.starts) == sorted(ids)
    else:
        assert not ledger.finished_by(first.pid)
        assert "ok=0 retried=0 dead=0 released=5 lease_lost=0" in log
        assert set(ledger.started_by(second.pid)) == set(ids)
    for queue in QUEUES:
        await e2e.wait_depth(QueueDepth(), queue)
    second.signal(signal.SIGTERM)
    assert await second.wait(20) == 0
    print(f"\n{signals} signal(s): the rest done {took:.1f}s after the first worker exited")
