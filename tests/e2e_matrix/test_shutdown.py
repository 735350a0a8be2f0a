"""SIGTERM on every broker: a worker drains its running jobs, or (a second signal, or its
grace running out) cancels and releases them, and another worker takes them at once."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from aioworkers import QueueDepth

from ..e2e.harness import wait_until
from .worlds import Matrix, counts

CONCURRENCY = 5
JOB_SECONDS = 1.5
# Far longer than the test: a job that is not released comes back only after this.
VISIBILITY = 60.0


@pytest.mark.parametrize("how", ["drain", "stop-now", "grace-out"])
async def test_sigterm_finishes_or_releases_jobs_and_another_worker_takes_them_at_once(
    e2e: Matrix, how: str
) -> None:
    # Two queues: one fetcher each, and slots are reserved before a fetch, so together
    # they hold no more than the concurrency, all of it running.
    queues = [e2e.queue_name("default"), e2e.queue_name("other")]
    by_queue: dict[str, list[str]] = {}
    if how == "grace-out":
        # As many jobs as slots, all far longer than the grace; a run after the first is quick.
        for queue, n in zip(queues, (3, 2), strict=True):
            by_queue[queue] = await e2e.enqueue(
                n, seconds=30.0, redelivered=0.01, track=True, queue=queue
            )
    else:
        for queue in queues:
            by_queue[queue] = await e2e.enqueue(8, seconds=JOB_SECONDS, track=True, queue=queue)
    ids = [job_id for queue in queues for job_id in by_queue[queue]]
    grace = 0.5 if how == "grace-out" else 30.0
    first = await e2e.start_worker(
        concurrency=CONCURRENCY, visibility=VISIBILITY, queues=queues, grace=grace
    )

    async def full_house() -> bool:
        return len((await e2e.ledger()).starts) == CONCURRENCY

    await wait_until(full_house, within=20, what="the first worker's jobs running")
    running = set((await e2e.ledger()).started_by(first.pid))
    if e2e.depth_shows_other_workers:
        held = [(await e2e.depth(q)).in_flight for q in queues]
        assert sum(held) == CONCURRENCY, held
    first.signal(signal.SIGTERM)
    if how == "stop-now":
        await asyncio.sleep(0.2)
        first.signal(signal.SIGTERM)  # stop now: cancel the running jobs and release them
    assert await first.wait(JOB_SECONDS + 15) == 0
    exited = time.monotonic()
    # Nothing left leased to it: what it did not finish is ready again, at once.
    finished = (await e2e.ledger()).finished_by(first.pid)
    for queue in queues:
        ready = len(set(by_queue[queue]) - finished)
        await e2e.wait_depth(QueueDepth(ready=ready), queue, within=2)

    second = await e2e.start_worker(concurrency=50, visibility=VISIBILITY, queues=queues, grace=30)
    await e2e.wait_done(len(ids), within=20)
    took = time.monotonic() - exited
    assert took < VISIBILITY / 4  # picked up at once, not after their leases ran out

    ledger = await e2e.ledger()
    assert ledger.done == set(ids)
    assert ledger.effects == dict.fromkeys(ids, 1)
    first_counts = counts(first)
    if how == "drain":
        # The running jobs finished on the first worker, which held no others.
        assert ledger.finished_by(first.pid) == running
        assert first_counts | {"ok": 0} == dict.fromkeys(first_counts, 0)
        assert first_counts["ok"] == CONCURRENCY
        assert sorted(job_id for job_id, _ in ledger.starts) == sorted(ids)
    else:
        assert not ledger.finished_by(first.pid)
        assert first_counts | {"released": 0} == dict.fromkeys(first_counts, 0)
        assert first_counts["released"] == CONCURRENCY
        assert set(ledger.started_by(second.pid)) == set(ids)
    for queue in queues:
        await e2e.wait_depth(QueueDepth(), queue)
    second.signal(signal.SIGTERM)
    assert await second.wait(20) == 0
    print(f"\n{e2e.name} {how}: the rest done {took:.1f}s after the first worker exited")
