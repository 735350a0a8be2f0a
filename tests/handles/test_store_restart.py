"""The state store restarted under a running worker and blocked waiters: a redis-server of
the test's own (append-only file, fsync on every write) as the store, the shared Redis as
the broker. Nothing is lost, no job runs twice, and every wait returns its result."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from aioworkers import App, QueueDepth, current_job

from ..e2e.harness import wait_until
from ..e2e.test_redis_faults import Server
from ..services import REDIS, REDIS_URL, delete_prefix, ensure

JOBS = 12
HELD = range(6, JOBS)  # these are running when the store goes down, and end while it is
# A record write that fails is retried for one lease: longer than the store is down.
LEASE = 10.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Server]:
    """A redis-server of the test's own that keeps every write (fsync on each)."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):  # as tests/services.py: a missing server fails CI
            pytest.fail("redis-server is not installed (CI is set)", pytrace=False)
        pytest.skip("redis-server is not installed")
    server = Server(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    await server.start()
    yield server
    await server.kill()


async def blocked_waiters(server: Server) -> int:
    """How many clients of ``server`` are blocked in a waiter's BLMOVE."""
    client = server.client()
    try:
        clients = await client.client_list()
    finally:
        await client.aclose()
    return sum(1 for c in clients if c.get("cmd") == "blmove")


def at_least(count: Callable[[], Awaitable[int]], n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await count() >= n

    return check


async def test_the_store_restarted_mid_run_loses_nothing_and_waits_resume(
    store: Server, caplog: pytest.LogCaptureFixture
) -> None:
    ensure(REDIS)
    prefix = f"test-store-restart-{uuid.uuid4().hex[:8]}"
    app = App(f"{REDIS_URL}?prefix={prefix}", store=store.url, visibility_timeout=LEASE)
    runs: Counter[str] = Counter()
    go = asyncio.Event()

    @app.task(result_ttl=600, retries=0)
    async def square(n: int) -> int:
        runs[current_job().id] += 1
        if n in HELD:
            await go.wait()
        return n * n

    jobs = await app.enqueue_many([square.call(n) for n in range(JOBS)])
    worker = app.worker()
    running = asyncio.create_task(worker.run())
    try:
        for n in range(HELD.start):
            assert await jobs[n].result(timeout=10) == n * n
        waits = [asyncio.create_task(job.result(timeout=30)) for job in jobs]

        async def held_blocked() -> int:
            return await blocked_waiters(store)

        await wait_until(at_least(held_blocked, len(HELD)), within=10, what="blocked waiters")
        await store.kill()  # SIGKILL: only what the append-only file holds survives
        go.set()  # the held jobs end while the store is down: their records wait for it

        held = [jobs[n] for n in HELD]

        async def outage_seen() -> bool:
            """Each held job's record write failed, and so did its waiter's wait."""
            logged = [r.getMessage() for r in caplog.records]
            return all(
                any(m.startswith(f"recording job {job} failed") for m in logged)
                and any(m.startswith(f"waiting for job {job}: store unavailable") for m in logged)
                for job in held
            )

        await wait_until(outage_seen, within=10, what="writes and waits to fail")
        await store.start()  # same port, same directory: the records are read back

        assert await asyncio.gather(*waits) == [n * n for n in range(JOBS)]
        assert [await job.status() for job in jobs] == ["succeeded"] * JOBS
        assert sorted(runs) == sorted(jobs)
        assert set(runs.values()) == {1}, "a job ran twice"
        # The store works on: a job enqueued after the restart round-trips too.
        assert await (await square.enqueue(JOBS)).result(timeout=10) == JOBS * JOBS

        async def all_acked() -> bool:
            return await app.broker.depth(app.queue) == QueueDepth()

        await wait_until(all_acked, within=10, what="every job acked, none dead")
    finally:
        worker.stop()
        await running
        await app.aclose()
        await delete_prefix(prefix)
