"""Consumers on moto SQS: S3 event notifications, SNS-wrapped messages (raw delivery off
and on) and EventBridge events, sent by a bare aiobotocore client, arrive decoded; a
failing one is retried with its body and attributes, its attempt in a message attribute."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from aiobotocore.session import get_session

import aioworkers
from aioworkers import Message

from ..services import moto_endpoint, sqs_url
from ._wait import until

POLL = 1.0

S3_EVENT = {
    "Records": [
        {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-east-1",
            "eventName": "ObjectCreated:Put",
            "s3": {
                "bucket": {"name": "uploads", "arn": "arn:aws:s3:::uploads"},
                "object": {"key": "photos/cat.jpg", "size": 1024, "eTag": "abc123"},
            },
        }
    ]
}
EVENTBRIDGE = {
    "version": "0",
    "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
    "detail-type": "Order Placed",
    "source": "com.example.shop",
    "time": "2026-12-07T02:00:00Z",
    "detail": {"order": 42},
}


def _sns(message: dict[str, Any]) -> bytes:
    """What SNS delivers to SQS with raw message delivery off."""
    return orjson.dumps(
        {
            "Type": "Notification",
            "MessageId": str(uuid.uuid4()),
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:orders",
            "Message": orjson.dumps(message).decode(),
            "Timestamp": "2026-12-07T02:00:00.000Z",
        }
    )


async def _send(endpoint: str, queue: str, bodies: list[tuple[bytes, dict[str, Any]]]) -> None:
    session = get_session()
    async with session.create_client("sqs", region_name="us-east-1", endpoint_url=endpoint) as c:
        url = (await c.create_queue(QueueName=queue))["QueueUrl"]
        for body, attrs in bodies:
            await c.send_message(QueueUrl=url, MessageBody=body.decode(), MessageAttributes=attrs)


async def test_s3_sns_and_eventbridge_shapes_arrive_decoded() -> None:
    endpoint = moto_endpoint()
    tag = uuid.uuid4().hex[:8]
    app = aioworkers.App(sqs_url(endpoint, create="1"), store="memory://")  # run-once keys
    uploads: list[tuple[str, str]] = []
    orders: list[Any] = []
    events: list[Any] = []

    @app.consumer(
        f"uploads-{tag}", idempotency_key=lambda b, m: b["Records"][0]["s3"]["object"]["eTag"]
    )
    async def on_upload(body: dict[str, Any]) -> None:
        for record in body["Records"]:
            uploads.append((record["s3"]["bucket"]["name"], record["s3"]["object"]["key"]))

    @app.consumer(f"orders-{tag}", decode="sns")
    async def on_order(body: dict[str, Any]) -> None:
        orders.append(body)

    @app.consumer(f"events-{tag}")
    async def on_event(body: dict[str, Any]) -> None:
        events.append((body["detail-type"], body["detail"]))

    await _send(endpoint, f"uploads-{tag}", [(orjson.dumps(S3_EVENT), {})] * 2)  # a duplicate
    await _send(
        endpoint,
        f"orders-{tag}",
        [(_sns({"order": 1}), {}), (orjson.dumps({"order": 2}), {})],  # raw delivery off, on
    )
    await _send(endpoint, f"events-{tag}", [(orjson.dumps(EVENTBRIDGE), {})])
    async with app.worker(poll=POLL):
        await until(lambda: len(orders) == 2 and bool(uploads) and bool(events), 30)
    await app.aclose()
    assert uploads == [("uploads", "photos/cat.jpg")]  # run once per object ETag
    assert sorted(o["order"] for o in orders) == [1, 2]
    assert events == [("Order Placed", {"order": 42})]


async def test_retry_keeps_body_and_attributes() -> None:
    endpoint = moto_endpoint()
    queue = f"retry-{uuid.uuid4().hex[:8]}"
    app = aioworkers.App(sqs_url(endpoint, create="1"), backoff=0.01, max_backoff=0.01)
    seen: list[tuple[bytes, int, Any]] = []

    @app.consumer(queue, decode="text", retries=1)
    async def on_message(body: str, message: Message) -> None:
        seen.append((message.body, message.attempt, message.headers.get("source")))
        raise RuntimeError("failing on purpose")

    attrs = {"source": {"DataType": "String", "StringValue": "billing"}}
    await _send(endpoint, queue, [(b"plain text, not JSON", attrs)])
    async with app.worker(poll=POLL):
        await until(lambda: len(seen) == 2, 30)  # its queues (the DLQ too) exist by now

        async def dead() -> bool:
            return len(await app.dlq(queue).list()) == 1

        await until(dead, 30)
        (letter,) = await app.dlq(queue).list()
    await app.aclose()
    assert seen == [(b"plain text, not JSON", n, "billing") for n in (1, 2)]
    assert (letter.reason, letter.body) == ("max_retries", b"plain text, not JSON")
