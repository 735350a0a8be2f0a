"""Redis restarted under a running worker: a server of the test's own, with AOF on."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis import exceptions as rexc

from aioworkers import QueueDepth

from .harness import E2E, RedisServer, wait_until

JOBS = 2_000
CONCURRENCY = 50


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):  # as tests/services.py: a missing server fails CI
            pytest.fail("redis-server is not installed (CI is set)", pytrace=False)
        pytest.skip("redis-server is not installed")
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        yield redis
    finally:
        await redis.kill()


@pytest.fixture
async def own(server: RedisServer, tmp_path: Path) -> AsyncIterator[E2E]:
    world = E2E(server.url, tmp_path)
    try:
        yield world
    finally:
        await world.aclose(delete_keys=False)  # the server and its files go with the test


async def test_worker_rides_out_a_redis_restart_and_finishes_every_job(
    own: E2E, server: RedisServer
) -> None:
    ids = await own.enqueue(JOBS, seconds=0.005)
    worker = await own.start_worker(concurrency=CONCURRENCY, visibility=10.0)
    await own.wait_done(JOBS // 4, within=30)
    assert await own.done() < JOBS // 2, "the run is nearly over before the outage"

    await server.stop()
    assert worker.alive
    await asyncio.sleep(1.0)
    assert worker.alive, worker.log()[-3000:]
    await server.start()
    restarted = time.monotonic()

    async def all_done() -> bool:
        assert worker.alive, worker.log()[-3000:]  # reconnects, never crash-loops
        try:
            return await own.done() >= JOBS
        except (rexc.ConnectionError, rexc.TimeoutError):
            return False

    await wait_until(all_done, within=60, what=f"{JOBS} jobs done after the restart")
    recovered = time.monotonic() - restarted

    ledger = await own.ledger()
    assert ledger.done == set(ids)
    assert set(ledger.effects) == set(ids)
    # A job whose effect landed but whose ack did not before the server went down runs
    # again: at most what one worker holds at once.
    assert len(ledger.duplicates) <= CONCURRENCY
    # A new client: the producer's pooled connections died with the old server.
    own.app = own.client()
    await own.wait_depth(QueueDepth())
    assert await own.app.dlq().list() == []
    worker.signal(signal.SIGTERM)
    assert await worker.wait(30) == 0
    log = worker.log()
    # Backed off, not a hot loop. (A short outage may not show at all: the client
    # retries a stale connection before the worker sees an error.)
    assert log.count("fetch from 'default' failed") < 30
    assert "Traceback" not in log
    print(f"\nrecovered in {recovered:.1f}s after the restart, {len(ledger.duplicates)} ran twice")
