"""Messages no producer of ours wrote, XADDed straight to the stream."""

from __future__ import annotations

import signal

import orjson

from aioworkers import QueueDepth

from .harness import E2E, wait_until


async def test_raw_garbage_is_dead_lettered_with_its_reason_and_the_worker_goes_on(
    e2e: E2E,
) -> None:
    def envelope(**fields: object) -> bytes:
        doc = {"v": 1, "id": "x", "task": "work", "args": [], "kwargs": {}, "attempt": 1}
        return orjson.dumps(doc | {"enqueued_at": 0} | fields)

    raw: list[tuple[dict[str, bytes], str]] = [
        ({"b": b"\xff\x00 not json \xc3\x28"}, "decode_error"),
        ({"b": b"[" * 100_000}, "decode_error"),  # deep nesting
        ({"x": b"an unexpected field name"}, "decode_error"),
        ({"b": b"b", "extra": b"field"}, "decode_error"),
        ({"b": b"[1, 2, 3]"}, "schema_error"),
        ({"b": b'{"v": 1}'}, "schema_error"),
        ({"b": envelope(v=2)}, "schema_error"),
        ({"b": envelope(attempt="1")}, "schema_error"),
        ({"b": b'{"v": 1, "id": "y", "task": "work", "args": {}, "kwargs": {}}'}, "schema_error"),
        ({"b": b" " * (1024 * 1024 + 1)}, "payload_too_large"),
    ]
    named: list[tuple[bytes, str, str]] = [
        (envelope(id="unknown-1", task="os.system", args=["true"]), "unknown-1", "unknown_task"),
        (envelope(id="args-1", kwargs={"nope": 1}), "args-1", "bad_arguments"),
    ]
    before = await e2e.enqueue(20, seconds=0.01)
    expected: dict[str, str] = {}
    for fields, reason in raw:
        entry_id = await e2e.redis.xadd(e2e.stream(), fields)
        expected[entry_id.decode()] = reason  # an undecodable job is named by its entry id
    for body, job_id, reason in named:
        await e2e.redis.xadd(e2e.stream(), {"b": body})
        expected[job_id] = reason
    after = await e2e.enqueue(20, seconds=0.01)

    worker = await e2e.start_worker(concurrency=10)

    async def settled() -> bool:
        assert worker.alive, worker.log()[-3000:]
        return (await e2e.depth()).dead == len(expected) and await e2e.done() == 40

    await wait_until(settled, within=20, what="the garbage in the DLQ and the jobs done")

    letters = await e2e.app.dlq().list(limit=100)
    assert {letter.id: letter.reason for letter in letters} == expected
    assert all(letter.attempts == 1 for letter in letters)
    ledger = await e2e.ledger()
    assert ledger.done == set(before + after)
    assert not ledger.duplicates
    await e2e.wait_depth(QueueDepth(dead=len(expected)))
    # Still fetching: a job enqueued now runs too.
    (late,) = await e2e.enqueue(1, seconds=0.0)
    await e2e.wait_done(41, within=10)
    assert late in (await e2e.ledger()).done
    worker.signal(signal.SIGTERM)
    assert await worker.wait(20) == 0
    log = worker.log()
    assert f"ok=41 retried=0 dead={len(expected)} " in log
    assert "Traceback" not in log
    # Bodies are never logged.
    assert "not json" not in log
    assert "unexpected field" not in log
