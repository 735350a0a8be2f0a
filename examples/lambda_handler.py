"""An AWS Lambda function that runs aioworkers tasks from an SQS queue.

Deploy with ``handler = aioworkers.lambda_handler(app)`` as the function's handler, an SQS
event source mapping with ``ReportBatchItemFailures``, and the queue's visibility timeout
at least the function's timeout. The same tasks run in ``aioworkers run`` workers too.

Run this file to try it locally against any SQS API server (moto, ElasticMQ):

    python -m moto.server -p 5000 &
    SQS_ENDPOINT_URL=http://127.0.0.1:5000 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x \\
        python examples/lambda_handler.py

It enqueues a few jobs, receives them the way Lambda's poller would, and calls the handler.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import aioworkers
from aioworkers import Reject

ENDPOINT = os.environ.get("SQS_ENDPOINT_URL", "")
URL = f"sqs://?region=us-east-1&endpoint_url={ENDPOINT}" if ENDPOINT else "sqs://"

app = aioworkers.App(os.environ.get("AIOWORKERS_BROKER_URL", URL), queue="lambda-demo")


@app.task(retries=3, timeout=10)
async def resize(image: str, width: int) -> None:
    print(f"resized {image} to {width}px")


@app.task
async def import_row(row: str) -> None:
    if not row.count(","):
        raise Reject(f"not a CSV row: {row!r}")  # straight to the DLQ, no retries


handler = aioworkers.lambda_handler(app)


# -- local demo: what Lambda does, by hand --------------------------------------------------


async def lambda_poll(n: int) -> dict[str, Any]:
    """Receive ``n`` messages and shape them as an SQS event for Lambda."""
    broker: Any = app.broker
    client = await broker.client()
    url = (await client.get_queue_url(QueueName=broker.sqs_name(app.queue)))["QueueUrl"]
    arn = f"arn:aws:sqs:us-east-1:000000000000:{broker.sqs_name(app.queue)}"
    records: list[dict[str, Any]] = []
    while len(records) < n:
        reply = await client.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        records += [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m["Attributes"],
                "messageAttributes": {
                    k: {"stringValue": v["StringValue"], "dataType": v["DataType"]}
                    for k, v in m.get("MessageAttributes", {}).items()
                },
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
            }
            for m in reply.get("Messages", [])
        ]
    return {"Records": records}


async def enqueue() -> dict[str, Any]:
    await resize.enqueue("cat.png", width=200)
    await resize.enqueue("dog.png", width=400)
    await import_row.enqueue("1,alice")
    await import_row.enqueue("garbage")
    return await lambda_poll(4)


def main() -> None:
    if not ENDPOINT:
        sys.exit("set SQS_ENDPOINT_URL (and dummy AWS credentials) to try this locally")
    from aioworkers.serverless import _event_loop

    loop = _event_loop()
    event = loop.run_until_complete(enqueue())
    result = handler(event, None)  # what Lambda calls
    print(f"batch of {len(event['Records'])}: {result}")
    for entry in loop.run_until_complete(app.dlq().list()):
        print(f"dead letter: {entry.task} {entry.reason}: {entry.error}")
    loop.run_until_complete(app.aclose())


if __name__ == "__main__":
    main()
