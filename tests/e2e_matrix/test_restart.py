"""The broker restarted under a running worker (Redis, RabbitMQ, SQS; a SQLite file has no
server): the worker rides it out, finishes every job once, and never crash-loops."""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aioworkers import QueueDepth

from .worlds import Matrix, Restart, own_tracebacks, restartable

CONCURRENCY = 20


@pytest.fixture(params=["redis", "amqp", "sqs", "postgres"])
async def world(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Matrix, Restart]]:
    async with restartable(request.param, tmp_path) as made:
        yield made


async def test_worker_rides_out_a_broker_restart_and_finishes_every_job_once(
    world: tuple[Matrix, Restart],
) -> None:
    e2e, restart = world
    queue = e2e.queue_name("default")
    jobs = e2e.restart_jobs
    # Idempotency keys (in the Redis that stays up): a job whose ack was lost with the
    # connection comes back, and is acknowledged as done without running again.
    ids = await e2e.enqueue(jobs, seconds=0.02, task="once")
    worker = await e2e.start_worker(concurrency=CONCURRENCY, visibility=10.0)
    await e2e.wait_done(jobs // 4, within=30)
    assert await e2e.done() < jobs // 2, "the run is nearly over before the restart"

    await restart()
    restarted = time.monotonic()
    await e2e.wait_done(jobs, within=60)  # fails at once if the worker exits
    recovered = time.monotonic() - restarted

    ledger = await e2e.ledger()
    assert ledger.done == set(ids)
    assert ledger.duplicates == {}
    # A new client: the producer's connections died with the old server.
    e2e.app = e2e.client()
    await e2e.wait_depth(QueueDepth(), queue)
    assert await e2e.app.dlq().list() == []
    await e2e.after_restart()
    assert worker.alive
    worker.signal(signal.SIGTERM)
    assert await worker.wait(30) == 0
    log = worker.log()
    # Backed off, not a hot loop. (A short outage may not show at all: the client
    # retries a stale connection before the worker sees an error.) Each job in flight
    # backs off its own settle from 0.05 s, doubling, and on PostgreSQL, where the state
    # store lives on the same server, its key's completion too: a few lines a job over an
    # outage of a second or two (a loaded machine has shown 106 lines in all), where a
    # loop that did not back off writes thousands.
    failures = re.findall(r"(?:unavailable|failed).*", log)
    per_key = Counter(re.findall(r"completing key '([^']+)' failed", log))
    assert len(failures) < CONCURRENCY * 12, log[-3000:]
    assert max(per_key.values(), default=0) < 10, log[-3000:]
    assert own_tracebacks(worker) == []
    print(f"\n{e2e.name}: recovered in {recovered:.1f}s after the restart")
