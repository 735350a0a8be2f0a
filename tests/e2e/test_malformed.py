"""Stream entries no producer of ours wrote, XADDed straight to the stream."""

from __future__ import annotations

import signal

from aioworkers import QueueDepth

from .harness import E2E, wait_until


async def test_stream_entries_with_unexpected_fields_are_dead_lettered_and_the_worker_goes_on(
    e2e: E2E,
) -> None:
    # Entries only a raw XADD can make (another writer on the stream): no body field, or
    # one too many. (Bodies that are no job, on every broker: ``tests/e2e_matrix``.)
    # An entry with no body field reads as the JSON object of its fields (what a consumer
    # with decode="fields" gets), which is no job: a schema_error on a task queue.
    raw: list[tuple[dict[str, bytes], str]] = [
        ({"x": b"an unexpected field name"}, "schema_error"),
        ({"b": b"b", "extra": b"field"}, "decode_error"),
    ]
    before = await e2e.enqueue(20, seconds=0.01)
    expected: dict[str, str] = {}
    for fields, reason in raw:
        entry_id = await e2e.redis.xadd(e2e.stream(), fields)
        expected[entry_id.decode()] = reason  # named by its entry id
    after = await e2e.enqueue(20, seconds=0.01)

    worker = await e2e.start_worker(concurrency=10)

    async def settled() -> bool:
        assert worker.alive, worker.log()[-3000:]
        return (await e2e.depth()).dead == len(expected) and await e2e.done() == 40

    await wait_until(settled, within=20, what="the entries in the DLQ and the jobs done")

    letters = await e2e.app.dlq().list(limit=100)
    assert {letter.id: letter.reason for letter in letters} == expected
    assert all(letter.attempts == 1 for letter in letters)
    ledger = await e2e.ledger()
    assert ledger.done == set(before + after)
    assert not ledger.duplicates
    await e2e.wait_depth(QueueDepth(dead=len(expected)))
    worker.signal(signal.SIGTERM)
    assert await worker.wait(20) == 0
    log = worker.log()
    assert f"ok=40 retried=0 dead={len(expected)} " in log
    assert "Traceback" not in log
    # Bodies are never logged.
    assert "unexpected field" not in log
