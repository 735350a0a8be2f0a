"""PostgreSQL end to end, what only it has: jobs enqueued inside the application's
transaction in this process while a worker runs in another (a job exists exactly when
its transaction commits), the migrate command, and a worker refusing an unmigrated
database. The ledger counts every run."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

from aioworkers import Call, QueueDepth

from ..e2e.harness import ROOT
from ..services import postgres_database
from .conftest import PostgresE2E


async def test_jobs_of_rolled_back_transactions_never_run_and_committed_ones_run_once(
    e2e: PostgresE2E,
) -> None:
    worker = await e2e.start_worker(concurrency=10, visibility=5)
    await e2e.started(worker)
    conn = await e2e.connect()
    try:
        await conn.execute("CREATE TABLE orders (id text PRIMARY KEY)")
        tx = conn.transaction()
        await tx.start()
        rolled_back = await e2e.app.enqueue("work", kwargs={"track": True}, conn=conn)
        rolled_back_too = await e2e.app.enqueue_many([Call("work", (), {"track": True})], conn=conn)
        await conn.execute("INSERT INTO orders VALUES ('rolled back')")
        # The worker listens and polls meanwhile: were the jobs visible, they would run now.
        await asyncio.sleep(1.5)
        assert (await e2e.ledger()).starts == []
        await tx.rollback()

        committed = []
        for n in range(5):
            async with conn.transaction():
                await conn.execute("INSERT INTO orders VALUES ($1)", f"order-{n}")
                committed.append(await e2e.app.enqueue("work", kwargs={"track": True}, conn=conn))
        await e2e.wait_done(len(committed), within=20)
        await asyncio.sleep(1.0)  # nothing more comes
        ledger = await e2e.ledger()
        assert ledger.done == set(committed)
        assert ledger.duplicates == {}
        assert not {rolled_back, *rolled_back_too} & {job_id for job_id, _ in ledger.starts}
        assert await conn.fetchval("SELECT count(*) FROM orders") == 5
    finally:
        await conn.close()
    await e2e.wait_depth(QueueDepth())
    worker.signal(signal.SIGTERM)
    assert await worker.wait(20) == 0


async def test_a_worker_refuses_an_unmigrated_database_and_migrate_fixes_it() -> None:
    def cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aioworkers", *args, "tests.e2e.ledger_app:app"],
            cwd=ROOT,
            env={"E2E_BROKER_URL": url, "E2E_LEDGER_URL": "redis://127.0.0.1:6379/0"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    async with postgres_database() as url:
        run = await asyncio.to_thread(cli, "run", "--burst", url=url)
        assert run.returncode == 2, run.stderr
        assert "aioworkers migrate MODULE:ATTR" in run.stderr
        assert "schema version 0" in run.stderr

        migrated = await asyncio.to_thread(cli, "migrate", url=url)
        assert (migrated.returncode, migrated.stdout) == (0, f"applied migrations 1, 2 to {url}\n")
        again = await asyncio.to_thread(cli, "migrate", url=url)
        assert again.stdout == f"nothing to migrate on {url}\n"

        run = await asyncio.to_thread(cli, "run", "--burst", url=url)
        assert run.returncode == 0, run.stderr
