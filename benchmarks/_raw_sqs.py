"""The raw side on SQS: a plain aiobotocore receive/delete loop doing the same work.

Several pollers (one per 10 free slots, at most 10), each a long-poll ReceiveMessage of
up to 10 messages while slots are free; one asyncio task per message (decode the
envelope, call the handler it names); deletes batched by DeleteMessageBatch (10 at a
time) while the next messages run (the loop is `_rawloop.py`'s). No leases, fencing,
retries or dead letters. Imports no part of aioworkers.

    python benchmarks/_raw_sqs.py '<spec json>'    (started by run.py --broker sqs)
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from _child import Spec, Work, main
from _rawloop import RawLoop
from aiobotocore.session import get_session

WAIT_SECONDS = 1
MAX_POLLERS = 10


class RawSqs(RawLoop[str]):
    def __init__(self, spec: Spec, work: Work) -> None:
        pollers = max(1, min(MAX_POLLERS, spec.concurrency // 10))
        super().__init__(spec, work, ack_batch=10, pollers=pollers)
        self.endpoint = spec.raw_url
        self.queue_name = spec.stream
        self.stack = contextlib.AsyncExitStack()
        self.client: Any = None
        self.queue_url = ""

    async def start(self) -> asyncio.Task[None]:
        session = get_session()
        self.client = await self.stack.enter_async_context(
            session.create_client("sqs", region_name="us-east-1", endpoint_url=self.endpoint)
        )
        self.queue_url = (await self.client.get_queue_url(QueueName=self.queue_name))["QueueUrl"]
        return await super().start()

    async def _fetch(self, free: int) -> list[tuple[str, str]]:
        reply = await self.client.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=min(10, free),
            WaitTimeSeconds=WAIT_SECONDS,
        )
        return [(m["ReceiptHandle"], m["Body"]) for m in reply.get("Messages", ())]

    async def _settle(self, batch: list[str]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(batch)]
        await self.client.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)

    async def stop(self) -> None:
        await super().stop()
        await self.stack.aclose()


if __name__ == "__main__":
    main(RawSqs)
