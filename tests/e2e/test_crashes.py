"""Workers that die: SIGKILL in the middle of a run, and a job that kills its worker."""

from __future__ import annotations

import signal
import time

import pytest

from aioworkers import QueueDepth

from .harness import E2E, WorkerProcess, wait_until

CONCURRENCY = 100


@pytest.mark.parametrize(
    ("jobs", "kills"),
    [
        pytest.param(5_000, 1, id="5k-1-kill"),
        pytest.param(
            100_000, 5, id="100k-5-kills", marks=[pytest.mark.slow, pytest.mark.timeout(600)]
        ),
    ],
)
async def test_sigkill_mid_run_loses_nothing_and_duplicates_only_jobs_in_flight(
    e2e: E2E, jobs: int, kills: int
) -> None:
    ids = await e2e.enqueue(jobs, seconds=0.005)
    in_flight_at_kills: set[str] = set()
    started = time.monotonic()
    for k in range(kills):
        worker = await e2e.start_worker(concurrency=CONCURRENCY, visibility=2.0)
        # Kill it well inside the run, busy with jobs fetched, running and being acked.
        target = await e2e.done() + jobs // (2 * kills + 2)
        await e2e.wait_done(target, within=60)

        async def holding(worker: WorkerProcess = worker) -> bool:
            # Not in the instant between an acked batch and the next fetch.
            return bool(await e2e.held_by(worker))

        await wait_until(holding, within=10, what="the worker to hold jobs")
        worker.signal(signal.SIGKILL)
        assert await worker.wait(10) == -signal.SIGKILL
        # What it fetched and never acked: running, or waiting for a slot.
        held = await e2e.held_by(worker)
        assert 0 < len(held) <= CONCURRENCY, f"kill {k}: it held {len(held)}"
        in_flight_at_kills |= await e2e.job_ids_of(held)
    done_at_kill = await e2e.done()
    assert done_at_kill < jobs, "the run was over before the kill"

    finisher = await e2e.start_worker(concurrency=CONCURRENCY, visibility=2.0)
    await e2e.wait_done(jobs, within=30 + jobs / 500)
    ledger = await e2e.ledger()

    assert ledger.done == set(ids)  # none missing, nothing else
    assert set(ledger.effects) == set(ids)
    # At-least-once: a job ran twice only if it was in flight at a kill.
    assert set(ledger.duplicates) <= in_flight_at_kills
    assert len(ledger.duplicates) <= CONCURRENCY * kills
    assert max(ledger.effects.values()) <= 1 + kills
    await e2e.wait_depth(QueueDepth())
    finisher.signal(signal.SIGTERM)
    assert await finisher.wait(30) == 0
    print(
        f"\n{jobs} jobs, {kills} kills: {done_at_kill} done at the last kill, "
        f"{len(in_flight_at_kills)} in flight at kills, {len(ledger.duplicates)} ran twice, "
        f"{time.monotonic() - started:.1f}s"
    )


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


async def test_job_that_kills_its_worker_is_dead_lettered_after_max_deliveries(e2e: E2E) -> None:
    max_deliveries = 2
    before = await e2e.enqueue(10, seconds=0.01)
    (poison,) = await e2e.enqueue(1, task="die")
    after = await e2e.enqueue(10, seconds=0.01)

    # A supervisor, as systemd or Kubernetes would be: restart the worker when it dies,
    # a bounded number of times. Concurrency 1, so the poison job is all a dying worker holds.
    deaths = 0
    worker = await e2e.start_worker(concurrency=1, visibility=1.0, max_deliveries=max_deliveries)

    async def settled() -> bool:
        nonlocal worker, deaths
        if not worker.alive:
            assert await worker.wait(5) == -signal.SIGKILL, worker.log()[-2000:]
            deaths += 1
            assert deaths <= max_deliveries + 1, "the poison job keeps killing workers"
            worker = await e2e.start_worker(
                concurrency=1, visibility=1.0, max_deliveries=max_deliveries
            )
        depth = await e2e.depth()
        return depth.dead == 1 and await e2e.done() == 20

    await wait_until(settled, within=40, what="the poison job in the DLQ and the rest done")

    (letter,) = await e2e.app.dlq().list()
    assert (letter.id, letter.task, letter.reason) == (poison, "die", "max_deliveries")
    assert deaths == max_deliveries
    ledger = await e2e.ledger()
    assert ledger.done == set(before + after)
    assert not ledger.duplicates
    assert [job_id for job_id, _ in ledger.starts] == [poison] * max_deliveries
    await e2e.wait_depth(QueueDepth(dead=1))
    assert worker.alive
    worker.signal(signal.SIGTERM)
    assert await worker.wait(20) == 0
    assert "dead-lettered (max_deliveries)" in worker.log()
