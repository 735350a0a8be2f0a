"""The Lambda adapter with job handles: a cancelled record is not run and is reported
done; a snoozed one is published again where the broker can (reported done), else left
to SQS to deliver again."""

from __future__ import annotations

from typing import Any

import aioworkers
from aioworkers.envelope import Envelope, encode, new_id

ARN = "arn:aws:sqs:us-east-1:123456789012:default"


def record(task: str, job_id: str) -> dict[str, Any]:
    body = encode(Envelope(id=job_id, task=task, args=[], kwargs={}))
    return {
        "messageId": f"m-{job_id}",
        "receiptHandle": f"r-{job_id}",
        "body": body.decode(),
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {},
        "eventSourceARN": ARN,
    }


async def test_cancelled_and_snoozed_records() -> None:
    app = aioworkers.App("memory://")
    ran: list[str] = []

    @app.task
    async def work() -> None:
        ran.append(aioworkers.current_job().id)

    @app.task
    async def later() -> None:
        raise aioworkers.Snooze(60)

    cancelled, snoozed, plain = new_id(), new_id(), new_id()
    assert await app.cancel(cancelled) is True
    handler = aioworkers.lambda_handler(app)
    event = {
        "Records": [record("work", cancelled), record("later", snoozed), record("work", plain)]
    }
    result = await handler.handle(event)
    failed = [f["itemIdentifier"] for f in result["batchItemFailures"]]
    assert ran == [plain]
    if failed:  # nowhere to publish (memory://): left to SQS to deliver again
        assert failed == [f"m-{snoozed}"]
        assert (await app.stats()).delayed == 0  # and not published too
    else:  # published again by the broker (sqs://): done here
        assert (await app.stats()).delayed == 1
