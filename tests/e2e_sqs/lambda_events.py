"""Lambda-shaped SQS events built from messages received from moto, shared by the Lambda
adapter's tests."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import aioworkers
from aioworkers.serverless import _event_loop


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """On the adapter's own loop, where the app's SQS client lives between invocations."""
    return _event_loop().run_until_complete(coro)


class Context:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def get_remaining_time_in_millis(self) -> int:
        return self.ms


async def queue_url(app: aioworkers.App) -> str:
    broker: Any = app.broker
    client = await broker.client()
    return str((await client.get_queue_url(QueueName=broker.sqs_name(app.queue)))["QueueUrl"])


async def receive_event(app: aioworkers.App, n: int, *, visibility: int = 30) -> dict[str, Any]:
    """What Lambda's event source mapping would hand the function: ``n`` records, received
    with the queue's ``visibility``."""
    broker: Any = app.broker
    client = await broker.client()
    url = await queue_url(app)
    arn = (await client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"]))[
        "Attributes"
    ]["QueueArn"]
    records: list[dict[str, Any]] = []
    for _ in range(20):
        reply = await client.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=min(10, n - len(records)),
            WaitTimeSeconds=1,
            VisibilityTimeout=visibility,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        for m in reply.get("Messages", []):
            records.append(
                {
                    "messageId": m["MessageId"],
                    "receiptHandle": m["ReceiptHandle"],
                    "body": m["Body"],
                    "attributes": m["Attributes"],
                    "messageAttributes": {
                        k: {"stringValue": v["StringValue"], "dataType": v["DataType"]}
                        for k, v in m.get("MessageAttributes", {}).items()
                    },
                    "md5OfBody": m["MD5OfBody"],
                    "eventSource": "aws:sqs",
                    "eventSourceARN": arn,
                    "awsRegion": "us-east-1",
                }
            )
        if len(records) >= n:
            break
    assert len(records) == n, f"received {len(records)} of {n}"
    return {"Records": records}


async def delete_done(app: aioworkers.App, event: dict[str, Any], result: dict[str, Any]) -> None:
    """What Lambda does after the function returns: delete the records not reported."""
    broker: Any = app.broker
    client = await broker.client()
    url = await queue_url(app)
    failed = {f["itemIdentifier"] for f in result["batchItemFailures"]}
    for r in event["Records"]:
        if r["messageId"] not in failed:
            await client.delete_message(QueueUrl=url, ReceiptHandle=r["receiptHandle"])


async def send_raw(app: aioworkers.App, body: str, attributes: dict[str, str]) -> str:
    """Send a message as another producer might, with string ``attributes``; its id."""
    broker: Any = app.broker
    client = await broker.client()
    reply = await client.send_message(
        QueueUrl=await queue_url(app),
        MessageBody=body,
        MessageAttributes={
            k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()
        },
    )
    return str(reply["MessageId"])
