"""Leases with real processes: heartbeats keep long jobs, a stalled worker is fenced."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from aioworkers import QueueDepth

from . import ledger_app
from .harness import E2E, WorkerProcess, consumer_pid, wait_until

VISIBILITY = 1.0


async def test_job_running_three_visibility_timeouts_is_not_redelivered(e2e: E2E) -> None:
    workers = [
        await e2e.start_worker(concurrency=2, visibility=VISIBILITY),
        await e2e.start_worker(concurrency=2, visibility=VISIBILITY),
    ]
    for worker in workers:
        await e2e.started(worker)
    # Two more long jobs than one worker can hold: both workers run some, and each is
    # watching (reclaiming) while the other's jobs run.
    ids = await e2e.enqueue(4, seconds=3.5 * VISIBILITY, track=True)
    await e2e.wait_done(4, within=20)

    ledger = await e2e.ledger()
    assert ledger.effects == dict.fromkeys(ids, 1)
    assert sorted(job_id for job_id, _ in ledger.starts) == sorted(ids)  # each started once
    assert {pid for _, pid in ledger.starts} == {w.pid for w in workers}
    await e2e.wait_depth(QueueDepth())
    for worker in workers:
        worker.signal(signal.SIGTERM)
        assert await worker.wait(20) == 0
        assert "lease_lost=0" in worker.log()


async def _owner(e2e: E2E) -> tuple[int, int]:
    """(pid of the worker holding the one pending entry, times it was delivered)."""
    (row,) = await e2e.pending()
    return consumer_pid(row["consumer"]), int(row["times_delivered"])


async def _started_by(e2e: E2E, job_id: str, worker: WorkerProcess, within: float) -> float:
    async def started() -> bool:
        return (job_id, worker.pid) in (await e2e.ledger()).starts

    await wait_until(started, within=within, what=f"{worker.name} to start {job_id}")
    return time.monotonic()


@pytest.mark.parametrize(
    ("resume", "task"),
    [
        ("while_its_run_sleeps", "work"),
        ("after_its_run_would_end", "work"),
        pytest.param(
            "after_its_run_would_end",
            "once",
            marks=pytest.mark.skipif(not ledger_app.IDEMPOTENCY, reason="no idempotency keys"),
        ),
    ],
)
async def test_stalled_worker_is_fenced_and_the_new_owner_settles(
    e2e: E2E, resume: str, task: str
) -> None:
    # The stalled run lasts 3 visibility timeouts, the owner's twice that: the test looks at
    # the owner's entry after the stalled worker has said all it will, while the owner runs.
    first_run, owner_run = 3 * VISIBILITY, 6 * VISIBILITY
    stalled = await e2e.start_worker(concurrency=1, visibility=VISIBILITY)
    (job_id,) = await e2e.enqueue(
        1, task=task, seconds=first_run, redelivered=owner_run, track=True
    )
    first_start = await _started_by(e2e, job_id, stalled, within=20)
    stalled.signal(signal.SIGSTOP)  # past its lease from now on: it cannot heartbeat

    owner = await e2e.start_worker(concurrency=1, visibility=VISIBILITY)
    second_start = await _started_by(e2e, job_id, owner, within=20)
    pid, deliveries = await _owner(e2e)
    assert pid == owner.pid
    if task == "work":
        assert deliveries == 2  # reclaimed: the second delivery of the same entry
    if resume == "after_its_run_would_end":
        # The stalled run's sleep is over: on SIGCONT it ends at once and tries to settle,
        # racing its own lease loop, which finds the lease lost.
        await asyncio.sleep(max(0.0, first_start + first_run + 0.2 - time.monotonic()))
    stalled.signal(signal.SIGCONT)

    async def stalled_gave_up() -> bool:
        return "lease lost" in stalled.log()

    await wait_until(stalled_gave_up, within=10, what="the stalled worker to see its lease lost")
    stalled.signal(signal.SIGTERM)
    assert await stalled.wait(20) == 0
    # Everything the stalled worker sent has arrived, and none of it settled the entry.
    assert time.monotonic() < second_start + owner_run, "too slow to look before the owner ends"
    assert (await _owner(e2e))[0] == owner.pid
    assert "ok=0 retried=0 dead=0 released=0 lease_lost=1" in stalled.log()

    async def owner_done() -> bool:
        return job_id in (await e2e.ledger()).finished_by(owner.pid)

    await wait_until(owner_done, within=owner_run + 10, what="the owner to finish the job")
    ledger = await e2e.ledger()
    assert ledger.starts == [(job_id, stalled.pid), (job_id, owner.pid)]
    assert ledger.by == {job_id: owner.pid}
    if resume == "while_its_run_sleeps":
        assert ledger.effects == {job_id: 1}  # the stalled run was cancelled before its end
    else:
        # The stalled handler's last write is on its way to Redis when its lease loop
        # cancels it: a side effect no broker or key can fence. What is fenced is its ack
        # (above) and, with a key, its commit: the owner's claim held to the end.
        assert ledger.effects[job_id] in (1, 2)
    await e2e.wait_depth(QueueDepth())
    owner.signal(signal.SIGTERM)
    assert await owner.wait(20) == 0
    owner_log = owner.log()
    assert "ok=1 retried=0 dead=0 released=0 lease_lost=0" in owner_log
    if task == "once":
        assert "lapsed before its job completed it" not in owner_log
        assert await e2e.redis.get(f"{e2e.prefix}:idem:once:{job_id}") == b"d"
    print(f"\n{resume} {task}: effects={ledger.effects[job_id]}")
