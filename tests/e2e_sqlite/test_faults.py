"""Worker processes sharing one SQLite file: kills, shutdown, poison, garbage, delays,
and the CLI from another process. Every effect is counted in the ledger."""

from __future__ import annotations

import signal
import subprocess
import sys

import orjson
import pytest

from aioworkers import QueueDepth

from ..e2e.harness import ROOT, check_a_poison_job_is_dead_lettered, delayed_retry_took, wait_until
from .conftest import SqliteE2E

EMPTY = QueueDepth()
CONCURRENCY = 20


@pytest.mark.parametrize(
    ("jobs", "kills"),
    [
        pytest.param(600, 1, id="600-1-kill"),
        pytest.param(
            20_000, 4, id="20k-4-kills", marks=[pytest.mark.slow, pytest.mark.timeout(600)]
        ),
    ],
)
async def test_sigkill_mid_run_loses_nothing(e2e: SqliteE2E, jobs: int, kills: int) -> None:
    ids = await e2e.enqueue(jobs, seconds=0.02, track=True)
    survivor = await e2e.start_worker(concurrency=CONCURRENCY, visibility=2)
    victims = []
    for _ in range(kills):
        victim = await e2e.start_worker(concurrency=CONCURRENCY, visibility=2)
        await e2e.wait_done(await e2e.done() + jobs // (2 * kills + 2), within=60)
        victim.signal(signal.SIGKILL)  # mid-run: it holds running jobs
        assert await victim.wait(10) == -signal.SIGKILL
        victims.append(victim)
    assert await e2e.done() < len(ids), "the run was over before the last kill"

    # The victims' leases lapse after 2 s and the survivor takes their jobs.
    await e2e.wait_done(len(ids), within=60 + jobs / 200)
    ledger = await e2e.ledger()
    assert ledger.done == set(ids)
    # At-least-once: only jobs a victim had started may have run twice, once more each.
    started_by_victims = {j for v in victims for j in ledger.started_by(v.pid)}
    assert set(ledger.duplicates) <= started_by_victims
    assert set(ledger.duplicates.values()) <= {2}
    assert len(ledger.duplicates) <= CONCURRENCY * kills
    await e2e.wait_depth(EMPTY)
    assert survivor.alive
    survivor.signal(signal.SIGTERM)
    assert await survivor.wait(20) == 0


async def test_sigterm_hands_running_jobs_to_another_worker_at_once(e2e: SqliteE2E) -> None:
    ids = await e2e.enqueue(4, seconds=30.0, track=True, redelivered=0.01)
    first = await e2e.start_worker(concurrency=4, visibility=60, grace=0.5)

    async def running() -> bool:
        return len((await e2e.ledger()).starts) == 4

    await wait_until(running, within=20, what="the first worker's four jobs")
    first.signal(signal.SIGTERM)
    assert await first.wait(20) == 0
    # Released, not left to a 60 s lease: the next worker runs them at once.
    await e2e.wait_depth(QueueDepth(ready=4), within=5)
    second = await e2e.start_worker(concurrency=4, visibility=60)
    await e2e.wait_done(4, within=20)
    ledger = await e2e.ledger()
    assert ledger.effects == dict.fromkeys(ids, 1)
    assert len(ledger.started_by(first.pid)) == 4
    assert ledger.finished_by(second.pid) == set(ids)


async def test_a_job_that_kills_its_worker_is_dead_lettered(e2e: SqliteE2E) -> None:
    await check_a_poison_job_is_dead_lettered(e2e, visibility=1)


async def test_garbage_is_dead_lettered_and_the_cli_sees_it_from_another_process(
    e2e: SqliteE2E,
) -> None:
    await e2e.app.broker.publish("default", [b"\xff\x00 not an envelope"])
    ids = await e2e.enqueue(3)
    await e2e.start_worker(concurrency=5)
    await e2e.wait_done(3, within=20)
    await e2e.wait_depth(QueueDepth(dead=1))
    assert (await e2e.ledger()).done == set(ids)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {"E2E_BROKER_URL": e2e.url, "E2E_LEDGER_URL": e2e.redis_url, "PATH": ""}
        return subprocess.run(
            [sys.executable, "-m", "aioworkers", *args, "tests.e2e.ledger_app:app"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    stats = cli("stats", "--json")
    assert stats.returncode == 0, stats.stderr
    depth = orjson.loads(stats.stdout)["queues"]["default"]
    assert depth | {"rates": None} == {
        "ready": 0,
        "in_flight": 0,
        "delayed": 0,
        "dead": 1,
        "rates": None,
    }
    listed = cli("dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = orjson.loads(listed.stdout)["default"]
    assert (entry["reason"], entry["task"]) == ("decode_error", None)
    purged = cli("dlq", "purge")
    assert purged.returncode == 0, purged.stderr
    await e2e.wait_depth(EMPTY)


async def test_a_delayed_retry_is_honoured_within_ten_percent(e2e: SqliteE2E) -> None:
    delay = 2.0
    took = await delayed_retry_took(e2e.client(), delay)
    assert delay * 0.95 <= took <= delay * 1.1, took
