"""Idempotency keys in the PostgreSQL store with real worker subprocesses: on a
``postgresql://`` broker the ledger app gives no ``store=``, so its keys are in the
broker's own database; a job enqueued twice under one key, run by two workers at once,
has one effect, and the keys are rows there."""

from __future__ import annotations

import signal

from aioworkers import QueueDepth

from ..e2e.harness import wait_until
from ..e2e_postgres.conftest import PostgresE2E, e2e

__all__ = ["e2e"]

KEYS = 40


async def test_two_workers_run_each_key_once_with_the_default_store(e2e: PostgresE2E) -> None:
    keys = [f"order-{i}" for i in range(KEYS)]
    for key in keys:
        await e2e.enqueue(2, task="once", seconds=0.05, key=key)
    workers = [await e2e.start_worker(concurrency=10, visibility=2.0) for _ in range(2)]

    async def settled() -> bool:
        return await e2e.done() == KEYS and await e2e.depth() == QueueDepth()

    await wait_until(settled, within=60, what=f"{KEYS} effects and an empty queue")
    ledger = await e2e.ledger()
    assert ledger.effects == dict.fromkeys(keys, 1)
    conn = await e2e.connect()
    try:
        done = await conn.fetchval(
            "SELECT count(*) FROM aioworkers_keys WHERE owner IS NULL AND key LIKE 'once:order-%'"
        )
    finally:
        await conn.close()
    assert done == KEYS
    for worker in workers:
        worker.signal(signal.SIGTERM)
        assert await worker.wait(20) == 0
