"""The Lambda adapter on SQS-shaped events built from messages received from moto: partial
batch failures, retries and dead letters written through the app's sqs:// broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import aioworkers
from aioworkers import QueueDepth, Reject, current_job

from ..services import moto_endpoint, sqs_url
from .lambda_events import Context, delete_done, receive_event, run

pytest.importorskip("aiobotocore")


@pytest.fixture
def app() -> Iterator[aioworkers.App]:
    app = aioworkers.App(
        sqs_url(moto_endpoint()), queue=f"lambda-{uuid.uuid4().hex[:12]}", visibility_timeout=2
    )
    try:
        yield app
    finally:
        run(app.aclose())


def test_a_batch_with_failures_retries_dead_letters_and_reports_only_what_must_come_back(
    app: aioworkers.App,
) -> None:
    seen: list[tuple[str, int, int]] = []

    @app.task
    async def ok(n: int) -> None:
        seen.append(("ok", n, current_job().attempt))

    @app.task(retries=2, backoff=0)
    async def flaky(n: int) -> None:
        seen.append(("flaky", n, current_job().attempt))
        raise ValueError(f"flaky {n}")

    @app.task
    async def poison() -> None:
        raise Reject("never valid")

    @app.task(timeout=0.2, retries=0)
    async def slow() -> None:
        await asyncio.sleep(5)

    async def enqueue() -> dict[str, Any]:
        await app.enqueue_many([ok.call(n) for n in range(5)])
        await flaky.enqueue(1)
        await poison.enqueue()
        await slow.enqueue()
        await app.broker.publish(app.queue, [b"\xff garbage"])
        return await receive_event(app, 9)

    event = run(enqueue())
    handler = aioworkers.lambda_handler(app)
    result = handler(event, Context(30_000))
    # Everything was settled through SQS: a retry sent as a new message, three dead
    # letters confirmed in the DLQ, so nothing needs Lambda to leave it in the queue.
    assert result == {"batchItemFailures": []}
    run(delete_done(app, event, result))
    assert sorted(x for x in seen if x[0] == "ok") == [("ok", n, 1) for n in range(5)]
    assert ("flaky", 1, 1) in seen

    dead = {e.reason: e for e in run(app.dlq().list())}
    assert sorted(dead) == ["decode_error", "max_retries", "rejected"]
    assert dead["rejected"].task == "poison"
    assert dead["max_retries"].task == "slow"
    assert dead["max_retries"].error_type == "TimeoutError"
    assert dead["decode_error"].body == b"\xff garbage"

    # The retry is the next attempt of flaky, in the queue now; warm invocation 2 runs it.
    client = run(app.broker.client())  # type: ignore[attr-defined]
    event = run(receive_event(app, 1))
    result = handler(event, Context(30_000))
    assert result == {"batchItemFailures": []}
    assert seen[-1] == ("flaky", 1, 2)
    assert run(app.broker.client()) is client  # type: ignore[attr-defined]
    run(delete_done(app, event, result))
    assert run(app.stats()) == QueueDepth(ready=1, dead=3)  # attempt 3 of flaky


def test_with_another_broker_failures_are_reported_for_redelivery(app: aioworkers.App) -> None:
    # The records come from SQS, the app runs on memory://: no broker to send retries or
    # dead letters to, so Lambda must keep those records (and the redrive policy ends them).
    local = aioworkers.App("memory://", queue=app.queue)

    @local.task
    async def ok() -> None:
        pass

    @local.task(backoff=0)
    async def fails() -> None:
        raise RuntimeError("boom")

    @local.task
    async def slow() -> None:
        await asyncio.sleep(30)

    async def enqueue() -> dict[str, Any]:
        await app.enqueue("ok")
        await app.enqueue("fails")
        await app.enqueue("slow")
        await app.broker.publish(app.queue, [b"{not json"])
        return await receive_event(app, 4)

    event = run(enqueue())
    ids = {
        aioworkers.envelope.decode(r["body"].encode()).task: r["messageId"]
        for r in event["Records"]
        if r["body"].startswith('{"v"')
    }
    garbage = next(r["messageId"] for r in event["Records"] if r["body"] == "{not json")
    # 1.5 s left: the slow job is cancelled at 0.5 s and reported.
    result = aioworkers.lambda_handler(local)(event, Context(1500))
    failed = sorted(f["itemIdentifier"] for f in result["batchItemFailures"])
    assert failed == sorted([ids["fails"], ids["slow"], garbage])


def test_receive_count_over_max_deliveries_is_dead_lettered(app: aioworkers.App) -> None:
    app.max_deliveries = 1
    runs: list[int] = []

    @app.task
    async def crashy() -> None:
        runs.append(1)

    run(crashy.enqueue())
    event = run(receive_event(app, 1))
    event["Records"][0]["attributes"]["ApproximateReceiveCount"] = "2"
    result = aioworkers.lambda_handler(app)(event, None)
    assert result == {"batchItemFailures": []}
    assert runs == []
    (entry,) = run(app.dlq().list())
    assert (entry.reason, entry.task) == ("max_deliveries", "crashy")


async def test_the_handler_also_works_when_called_inside_a_running_loop() -> None:
    app = aioworkers.App("memory://", queue="q")
    seen: list[int] = []

    @app.task
    async def ok(n: int) -> None:
        seen.append(n)

    body = aioworkers.envelope.encode(
        aioworkers.envelope.Envelope(id="j1", task="ok", args=[7], kwargs={})
    )
    event = {
        "Records": [
            {
                "messageId": "m1",
                "body": body.decode(),
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:q",
            }
        ]
    }
    assert aioworkers.lambda_handler(app)(event, None) == {"batchItemFailures": []}
    assert seen == [7]
