"""Jobs no handler can run, on every broker: one that kills its worker is dead-lettered
after ``max_deliveries``; bodies that are not jobs are dead-lettered with their reason at
once; the worker goes on with the rest."""

from __future__ import annotations

import signal

import orjson

from aioworkers import QueueDepth

from ..e2e.harness import WorkerProcess, wait_until
from .worlds import Matrix, counts, own_tracebacks


async def test_a_job_that_kills_its_worker_is_dead_lettered_after_max_deliveries(
    e2e: Matrix,
) -> None:
    max_deliveries = 2
    before = await e2e.enqueue(10, seconds=0.01)
    (poison,) = await e2e.enqueue(1, task="die")
    after = await e2e.enqueue(10, seconds=0.01)
    # Whole seconds: the shortest lease SQS grants.
    visibility = 1.0

    # A supervisor, as systemd or Kubernetes would be: restart the worker when it dies,
    # a bounded number of times. Concurrency 1, so the poison job is all a dying worker holds.
    deaths = 0

    async def start() -> WorkerProcess:
        return await e2e.start_worker(
            concurrency=1, visibility=visibility, max_deliveries=max_deliveries
        )

    worker = await start()

    async def settled() -> bool:
        nonlocal worker, deaths
        if not worker.alive:
            assert await worker.wait(5) == -signal.SIGKILL, worker.log()[-2000:]
            deaths += 1
            assert deaths <= max_deliveries + 1, "the poison job keeps killing workers"
            worker = await start()
        return (await e2e.depth(e2e.queue_name("default"))).dead == 1 and await e2e.done() == 20

    await wait_until(settled, within=40, what="the poison job in the DLQ and the rest done")

    (letter,) = await e2e.app.dlq().list()
    assert (letter.id, letter.task, letter.reason) == (poison, "die", "max_deliveries")
    assert deaths == max_deliveries
    ledger = await e2e.ledger()
    assert ledger.done == set(before + after)
    assert not ledger.duplicates
    # Delivered three times, run twice: the third delivery was dead-lettered unrun.
    assert [job_id for job_id, _ in ledger.starts] == [poison] * max_deliveries
    await e2e.wait_depth(QueueDepth(dead=1), e2e.queue_name("default"))
    assert worker.alive
    worker.signal(signal.SIGTERM)
    assert await worker.wait(20) == 0
    assert "dead-lettered (max_deliveries)" in worker.log()


def _envelope(**fields: object) -> bytes:
    doc = {"v": 1, "id": "x", "task": "work", "args": [], "kwargs": {}, "attempt": 1}
    return orjson.dumps(doc | {"enqueued_at": 0} | fields)


# Bodies that are not jobs, and the reason each is dead-lettered for.
GARBAGE: list[tuple[bytes, str]] = [
    (b"\xff\x00 not json \xc3\x28", "decode_error"),
    (b"[" * 100_000, "decode_error"),  # deep nesting
    (b"", "decode_error"),
    (b"[1, 2, 3]", "schema_error"),
    (b'{"v": 1}', "schema_error"),
    (_envelope(v=2), "schema_error"),
    (_envelope(attempt="1"), "schema_error"),
    (b'{"v": 1, "id": "y", "task": "work", "args": {}, "kwargs": {}}', "schema_error"),
    (b" " * (1024 * 1024 + 1), "payload_too_large"),
]
# Well-formed envelopes no handler may run: named by their job id in the DLQ.
NAMED: list[tuple[bytes, str, str]] = [
    (_envelope(id="unknown-1", task="os.system", args=["true"]), "unknown-1", "unknown_task"),
    (_envelope(id="args-1", kwargs={"nope": 1}), "args-1", "bad_arguments"),
]


async def test_garbage_is_dead_lettered_with_its_reason_and_the_worker_goes_on(
    e2e: Matrix,
) -> None:
    queue = e2e.queue_name("default")
    garbage = [(body, reason) for body, reason in GARBAGE if len(body) <= e2e.max_body]
    before = await e2e.enqueue(20, seconds=0.01)
    await e2e.publish_raw([body for body, _ in garbage])
    await e2e.publish_raw([body for body, _, _ in NAMED])
    after = await e2e.enqueue(20, seconds=0.01)
    dead = len(garbage) + len(NAMED)

    worker = await e2e.start_worker(concurrency=10)

    async def settled() -> bool:
        e2e.check_workers()
        return (await e2e.depth(queue)).dead == dead and await e2e.done() == 40

    await wait_until(settled, within=20, what="the garbage in the DLQ and the jobs done")

    letters = await e2e.app.dlq().list(limit=100)
    named = {job_id: reason for _, job_id, reason in NAMED}
    assert {e.id: e.reason for e in letters if e.id in named} == named
    # A body that is no job is named by the broker's message id: matched by its body here.
    unnamed = [e for e in letters if e.id not in named]
    assert sorted((e.body, e.reason) for e in unnamed) == sorted(garbage)
    assert all(e.task is None for e in unnamed)
    assert all(letter.attempts == 1 for letter in letters)
    ledger = await e2e.ledger()
    assert ledger.done == set(before + after)
    assert not ledger.duplicates
    await e2e.wait_depth(QueueDepth(dead=dead), queue)
    # Still fetching: a job enqueued now runs too.
    (late,) = await e2e.enqueue(1, seconds=0.0)
    await e2e.wait_done(41, within=10)
    assert late in (await e2e.ledger()).done
    worker.signal(signal.SIGTERM)
    assert await worker.wait(20) == 0
    assert counts(worker) | {"ok": 0, "dead": 0} == dict.fromkeys(counts(worker), 0)
    assert (counts(worker)["ok"], counts(worker)["dead"]) == (41, dead)
    log = worker.log()
    assert own_tracebacks(worker) == []
    assert "Traceback" not in log
    # Bodies are never logged.
    assert "not json" not in log
