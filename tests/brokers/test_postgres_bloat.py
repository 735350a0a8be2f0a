"""The jobs table after a run on ``postgresql://``: finished rows are deleted and the space
comes back (an idle worker vacuums a drained table; autovacuum runs with the settings the
migration gave the table), so the table's size returns near its start, and a second run
of the same size reuses the first one's space."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from aioworkers import App, QueueDepth

from ..services import postgres_database

SIZES = """
SELECT pg_table_size('aioworkers_jobs'), pg_indexes_size('aioworkers_jobs'),
    (SELECT count(*) FROM aioworkers_counts)
"""


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with postgres_database() as url:
        assert await App(url).migrate() == [1, 2]
        yield url


async def _run(app: App, jobs: int, conn: asyncpg.Connection, heap_at_start: int) -> None:
    """Run ``jobs`` jobs with a worker that stays up, until the table is drained and the
    worker, idle, has vacuumed it (within a few seconds)."""
    task = app.tasks["noop"]
    for start in range(0, jobs, 1000):
        await app.enqueue_many([task.call(n) for n in range(start, min(start + 1000, jobs))])
    worker = app.worker(concurrency=100, poll=0.1)
    async with asyncio.timeout(30 + jobs / 500), worker:
        for _ in range(int(300 + jobs / 50)):  # settled, acks included (within the timeout)
            if worker.counts.get("ok", 0) >= jobs:
                break
            await asyncio.sleep(0.1)
        assert await app.stats() == QueueDepth()
        # The idle worker's vacuum gives the drained heap's pages back; only the free-space
        # and visibility maps may remain.
        heap = None
        for _ in range(50):
            heap = await conn.fetchval("SELECT pg_table_size('aioworkers_jobs')")
            if heap <= heap_at_start + 64 * 1024:
                break
            await asyncio.sleep(0.1)
        assert heap is not None
        assert heap <= heap_at_start + 64 * 1024, (heap_at_start, heap)
    assert worker.counts == {"ok": jobs}


@pytest.mark.parametrize(
    ("jobs", "runs"),
    [
        (5_000, 3),
        pytest.param(100_000, 1, marks=[pytest.mark.slow, pytest.mark.timeout(900)]),
    ],
)
async def test_the_table_size_returns_near_its_start_after_a_run(
    url: str, jobs: int, runs: int
) -> None:
    app = App(f"{url}?poll=0.1&vacuum=0.2", visibility_timeout=30)

    @app.task
    async def noop(n: int) -> None:
        pass

    conn = await asyncpg.connect(url)
    try:
        heap_at_start, _, _ = await conn.fetchrow(SIZES)
        indexes = []
        for _ in range(runs):
            await _run(app, jobs, conn, heap_at_start)
            _, index_size, deltas = await conn.fetchrow(SIZES)
            # One counter row per batch, folded into the totals every few seconds.
            assert deltas < jobs / 10, deltas
            indexes.append(index_size)
        assert await app.broker.totals("default") == {  # type: ignore[attr-defined]
            "added": jobs * runs,
            "left": jobs * runs,
            "dead": 0,
        }
        assert (await conn.fetchrow(SIZES))[2] == 0
        # Index pages emptied by one run's vacuum are reused once the next one has found
        # them safe to recycle: the indexes stop growing after the second run.
        if runs >= 3:
            assert indexes[-1] <= indexes[1] * 1.2 + 64 * 1024, indexes
    finally:
        await conn.close()
        await app.aclose()
