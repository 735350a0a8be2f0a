"""Workers killed with SIGKILL in the middle of a run, on every broker: nothing is lost,
and only what the dead worker had in flight may run twice."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from aioworkers import QueueDepth

from ..e2e.harness import wait_until
from .worlds import Matrix


async def _kill_mid_run(e2e: Matrix, *, concurrency: int, jobs: int) -> tuple[set[str], int]:
    """Start a worker alone, let it do ``jobs`` more, kill it; returns the jobs that may run
    twice because of the kill: those it had finished (their effect is in the ledger) and
    held (the broker shows them leased to it; where the broker cannot tell, those it had
    started), and how many it held (where the broker's depth shows that)."""
    victim = await e2e.start_worker(concurrency=concurrency, visibility=2.0)
    await e2e.wait_done(await e2e.done() + jobs, within=60)

    async def running() -> bool:
        # Not in the instant between an acked batch and the next fetch.
        ledger = await e2e.ledger()
        return bool(set(ledger.started_by(victim.pid)) - ledger.done)

    # Polled often: on a fast broker a batch's jobs run for a few ms between its fetch and
    # its ack, and at 50 ms a run of a few hundred jobs could end between two looks.
    await wait_until(running, within=10, what="the worker to be running jobs", every=0.01)
    victim.signal(signal.SIGKILL)
    assert await victim.wait(10) == -signal.SIGKILL
    # What it fetched and never acked: running, finished but not acked yet, or waiting.
    held = await e2e.held(victim)
    if held is not None:
        assert 0 < len(held) <= concurrency, f"it held {len(held)} with {concurrency} slots"
    in_flight = (await e2e.depth(e2e.queue_name("default"))).in_flight
    if e2e.depth_shows_other_workers:
        assert 0 < in_flight <= concurrency, f"it held {in_flight} with {concurrency} slots"
    # Nothing else runs now: let the ledger writes it sent before it died land, then read.
    await asyncio.sleep(0.2)
    ledger = await e2e.ledger()
    started = set(ledger.started_by(victim.pid))
    return ledger.done & (started if held is None else held & started), in_flight


@pytest.mark.parametrize(
    "kills",
    [
        pytest.param(1, id="1-kill"),
        pytest.param(0, id="soak", marks=[pytest.mark.slow, pytest.mark.timeout(900)]),
    ],
)
async def test_sigkill_mid_run_loses_nothing_and_duplicates_only_jobs_in_flight(
    e2e: Matrix, kills: int
) -> None:
    jobs, concurrency = e2e.kill_size
    if not kills:  # the soak: many more jobs, several kills
        jobs, kills = e2e.soak_size
    # Plain jobs and jobs under an idempotency key, interleaved: a killed worker's claims
    # hold their jobs back for one lease, and they run once more at most.
    ids: list[str] = []
    half = max(10, jobs // 100)
    for _ in range(0, jobs, 2 * half):
        for task in ("work", "once"):
            ids += await e2e.enqueue(half, seconds=0.005, track=True, task=task)
    jobs = len(ids)
    may_run_twice: set[str] = set()
    held = 0
    began = time.monotonic()
    for _ in range(kills):
        done_held, in_flight = await _kill_mid_run(
            e2e, concurrency=concurrency, jobs=jobs // (2 * kills + 2)
        )
        may_run_twice |= done_held
        held += in_flight
    done_at_kill = await e2e.done()
    assert done_at_kill < jobs, "the run was over before the last kill"

    # What the victims held comes back when their leases run out, to the next worker.
    finisher = await e2e.start_worker(concurrency=concurrency, visibility=2.0)
    await e2e.wait_done(jobs, within=30 + jobs / 100)
    ledger = await e2e.ledger()
    assert ledger.done == set(ids)  # none missing, nothing else
    assert set(ledger.effects) == set(ids)
    # At-least-once: a job ran twice only if a killed worker had finished it and not
    # acked it yet; once more per kill at most.
    assert set(ledger.duplicates) <= may_run_twice
    assert len(ledger.duplicates) <= (
        held if e2e.depth_shows_other_workers else concurrency * kills
    )
    assert max(ledger.effects.values()) <= 1 + kills
    await e2e.wait_depth(QueueDepth(), e2e.queue_name("default"))
    finisher.signal(signal.SIGTERM)
    assert await finisher.wait(30) == 0
    print(
        f"\n{e2e.name}: {jobs} jobs, {kills} kill(s): {done_at_kill} done at the last kill, "
        f"{len(may_run_twice)} done but held at kills, {len(ledger.duplicates)} ran twice, "
        f"{time.monotonic() - began:.1f}s"
    )
