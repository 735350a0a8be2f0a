"""Idempotency keys with real workers: a job delivered twice has one effect."""

from __future__ import annotations

import re
import signal

import pytest

from aioworkers import QueueDepth

from . import ledger_app
from .harness import E2E, WorkerProcess, wait_until

pytestmark = pytest.mark.skipif(
    not ledger_app.IDEMPOTENCY, reason="this aioworkers has no idempotency keys"
)

KEYS = 100
COPIES = 50


def _counts(worker: WorkerProcess) -> dict[str, int]:
    (summary,) = re.findall(r"worker stopped .*> (.*)", worker.log())
    return {name: int(n) for name, n in (item.split("=") for item in summary.split())}


async def test_job_delivered_twice_with_the_same_key_has_one_effect(e2e: E2E) -> None:
    # Two jobs per key (another producer, or a producer's retry, sent it again) ...
    keys = [f"order-{i}" for i in range(KEYS)]
    for key in keys:
        await e2e.enqueue(2, task="once", seconds=0.1, key=key)
    # ... and the very same message twice (a broker's redelivery): its key is its job id.
    copied = await e2e.enqueue(COPIES, task="once", seconds=0.1)
    for _, fields in await e2e.redis.xrange(e2e.stream(), count=2 * KEYS + COPIES):
        if b'"key"' not in fields[b"b"]:
            await e2e.redis.xadd(e2e.stream(), fields)
    effects = len(keys) + len(copied)
    workers = [await e2e.start_worker(concurrency=20, visibility=2.0) for _ in range(2)]

    async def settled() -> bool:
        return await e2e.done() == effects and await e2e.depth() == QueueDepth()

    await wait_until(settled, within=60, what=f"{effects} effects and an empty queue")
    ledger = await e2e.ledger()
    assert ledger.effects == dict.fromkeys(keys + copied, 1)

    counts = {"ok": 0, "duplicate": 0, "lease_lost": 0, "retried": 0, "dead": 0}
    for worker in workers:
        worker.signal(signal.SIGTERM)
        assert await worker.wait(20) == 0
        for name, n in _counts(worker).items():
            counts[name] = counts.get(name, 0) + n
    # Every second delivery was acknowledged without running (after waiting while the
    # first one ran, if the two ran at once: deferred).
    assert counts["ok"] == effects
    assert counts["duplicate"] == effects
    assert counts["lease_lost"] == counts["retried"] == counts["dead"] == 0
    print(f"\n{effects} keys delivered twice: {counts}")
