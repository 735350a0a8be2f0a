"""Conformance checks: the public App API (enqueue, a worker, the DLQ) on the broker."""

from __future__ import annotations

import asyncio

from ..app import App
from ..brokers.base import DeadLetterAdmin, QueueDepth
from ..job import current_job
from ._exercise import EMPTY, Exercise, check


def _app(ex: Exercise) -> App:
    return App(ex.broker, queue=ex.queue, visibility_timeout=ex.lease)


async def _run_burst(ex: Exercise, app: App) -> dict[str, int]:
    worker = app.worker(concurrency=5, poll=0.1)
    async with ex.time_flows(), asyncio.timeout(10 + ex.slack):
        await worker.run(burst=True)
    return worker.counts


@check()
async def check_app_runs_every_job_exactly_once(ex: Exercise) -> None:
    """Jobs enqueued one by one and in a batch all run once, as attempt 1."""
    app = _app(ex)
    seen: list[tuple[str, int, int]] = []

    @app.task
    async def record(n: int) -> None:
        job = current_job()
        seen.append((job.id, job.attempt, n))
        await asyncio.sleep(0.01)

    ids = [await record.enqueue(i) for i in range(10)]
    ids += await app.enqueue_many([record.call(i) for i in range(10, 20)])
    assert len(set(ids)) == 20

    assert await _run_burst(ex, app) == {"ok": 20}
    assert sorted(n for _, _, n in seen) == list(range(20))
    assert sorted(job_id for job_id, _, _ in seen) == sorted(ids)
    assert all(attempt == 1 for _, attempt, _ in seen)
    await ex.wait_depth(ex.queue, EMPTY)


@check()
async def check_app_dead_letters_undecodable_messages_and_runs_the_rest(ex: Exercise) -> None:
    """Garbage, a wrong shape and an unknown task are dead-lettered with their reasons;
    the good jobs run."""
    app = _app(ex)
    seen: list[int] = []

    @app.task
    async def record(n: int) -> None:
        seen.append(n)

    garbage = b"\xff\x00 not an envelope"
    await ex.broker.publish(ex.queue, [garbage])
    for n in range(3):
        await record.enqueue(n)
    await ex.broker.publish(ex.queue, [b"[1, 2]"])
    unknown_id = await app.enqueue("no_such_task", args=[1])

    assert await _run_burst(ex, app) == {"ok": 3, "dead": 3}
    assert sorted(seen) == [0, 1, 2]
    await ex.wait_depth(ex.queue, QueueDepth(dead=3))
    if not isinstance(ex.broker, DeadLetterAdmin):
        return
    dead = {e.reason: e for e in await app.dlq().list()}
    assert sorted(dead) == ["decode_error", "schema_error", "unknown_task"]
    assert (dead["decode_error"].body, dead["decode_error"].task) == (garbage, None)
    assert dead["decode_error"].attempts == 1
    assert dead["decode_error"].error_type == "DecodeError"
    assert dead["schema_error"].body == b"[1, 2]"
    assert (dead["unknown_task"].id, dead["unknown_task"].task) == (unknown_id, "no_such_task")


@check(DeadLetterAdmin)
async def check_app_dlq_replay_reruns_as_attempt_one_and_purge_empties(ex: Exercise) -> None:
    """A job out of retries is dead-lettered with its redacted error; replayed, it runs
    again as attempt 1; purge empties the DLQ."""
    app = _app(ex)
    failing = True
    runs: list[tuple[str, int]] = []

    @app.task(retries=1, backoff=0)
    async def flaky(n: int) -> None:
        job = current_job()
        runs.append((job.id, job.attempt))
        if failing:
            raise RuntimeError("cannot reach redis://app:s3cret@cache:6379")

    first = await flaky.enqueue(1)
    second = await flaky.enqueue(2)
    assert await _run_burst(ex, app) == {"retried": 2, "dead": 2}
    assert sorted(runs) == sorted([(first, 1), (first, 2), (second, 1), (second, 2)])

    entries = {e.id: e for e in await app.dlq().list()}
    assert sorted(entries) == sorted([first, second])
    entry = entries[first]
    assert (entry.task, entry.reason, entry.attempts) == ("flaky", "max_retries", 2)
    assert entry.error == "RuntimeError: cannot reach redis://app:***@cache:6379"
    assert entry.error_type == "RuntimeError"
    assert entry.traceback is not None
    assert "s3cret" not in entry.traceback

    failing = False
    runs.clear()
    assert await app.dlq().replay([first]) == 1
    assert [e.id for e in await app.dlq().list()] == [second]
    assert await _run_burst(ex, app) == {"ok": 1}
    assert runs == [(first, 1)]

    assert await app.dlq().purge() == 1
    assert await app.dlq().list() == []
    assert await app.dlq().purge() == 0
    await ex.wait_depth(ex.queue, EMPTY)


@check(DeadLetterAdmin)
async def check_app_dlq_replay_all(ex: Exercise) -> None:
    """Replaying the whole DLQ puts every entry back as attempt 1, once."""
    app = _app(ex)
    failing = True
    runs: list[tuple[int, int]] = []

    @app.task(retries=0)
    async def flaky(n: int) -> None:
        runs.append((n, current_job().attempt))
        if failing:
            raise ValueError(n)

    await app.enqueue_many([flaky.call(n) for n in range(3)])
    assert await _run_burst(ex, app) == {"dead": 3}
    await ex.wait_depth(ex.queue, QueueDepth(dead=3))

    failing = False
    runs.clear()
    assert await app.dlq().replay() == 3
    await ex.wait_depth(ex.queue, QueueDepth(ready=3))
    assert await _run_burst(ex, app) == {"ok": 3}
    assert sorted(runs) == [(0, 1), (1, 1), (2, 1)]
    assert await app.dlq().replay() == 0
    await ex.wait_depth(ex.queue, EMPTY)
