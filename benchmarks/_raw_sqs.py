"""The raw side on SQS: a plain aiobotocore receive/delete loop doing the same work.

Several pollers (one per 10 free slots, at most 10), each a long-poll ReceiveMessage of
up to 10 messages while slots are free; one asyncio task per message (decode the
envelope, call the handler it names); deletes batched by DeleteMessageBatch (10 at a
time) while the next messages run. No leases, fencing, retries or dead letters. Imports
no part of aioworkers.

    python benchmarks/_raw_sqs.py '<spec json>'    (started by run.py --broker sqs)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from _child import Spec, Work, main
from aiobotocore.session import get_session

WAIT_SECONDS = 1
MAX_POLLERS = 10


class RawSqs:
    def __init__(self, spec: Spec, work: Work) -> None:
        self.endpoint = spec.raw_url
        self.queue_name = spec.stream
        self.capacity = spec.concurrency
        self.handlers: dict[str, Callable[..., Coroutine[Any, Any, None]]] = work.handlers
        self.running = 0
        self.jobs: set[asyncio.Task[None]] = set()
        self.deletes: list[str] = []
        self.delete_wake = asyncio.Event()
        self.room = asyncio.Event()
        self.stopping = False
        self.stack = contextlib.AsyncExitStack()
        self.client: Any = None
        self.queue_url = ""
        self.pollers: list[asyncio.Task[None]] = []
        self.deleter: asyncio.Task[None] | None = None

    async def start(self) -> asyncio.Task[None]:
        session = get_session()
        self.client = await self.stack.enter_async_context(
            session.create_client("sqs", region_name="us-east-1", endpoint_url=self.endpoint)
        )
        self.queue_url = (await self.client.get_queue_url(QueueName=self.queue_name))["QueueUrl"]
        self.deleter = asyncio.create_task(self._delete_loop())
        n = max(1, min(MAX_POLLERS, self.capacity // 10))
        self.pollers = [asyncio.create_task(self._poll()) for _ in range(n)]
        return asyncio.create_task(self._all_pollers())

    async def _all_pollers(self) -> None:
        await asyncio.gather(*self.pollers)

    async def _poll(self) -> None:
        while not self.stopping:
            free = self.capacity - self.running
            if free <= 0:
                self.room.clear()
                await self.room.wait()
                continue
            reply = await self.client.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=min(10, free),
                WaitTimeSeconds=WAIT_SECONDS,
            )
            for message in reply.get("Messages", ()):
                self.running += 1
                job = asyncio.create_task(self._run(message))
                self.jobs.add(job)  # the loop keeps only weak references to tasks
                job.add_done_callback(self.jobs.discard)

    async def _run(self, message: dict[str, Any]) -> None:
        try:
            env = orjson.loads(message["Body"])
            await self.handlers[env["task"]](*env["args"], **env["kwargs"])
        finally:
            self.deletes.append(message["ReceiptHandle"])
            self.delete_wake.set()
            self.running -= 1
            self.room.set()

    async def _delete_loop(self) -> None:
        while True:
            await self.delete_wake.wait()
            self.delete_wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        while self.deletes:
            batch = self.deletes[:10]
            del self.deletes[:10]
            entries = [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(batch)]
            await self.client.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)

    async def stop(self) -> None:
        self.stopping = True
        self.room.set()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.pollers)
        await asyncio.gather(*self.jobs)
        if self.deleter is not None:
            self.deleter.cancel()
        await self._flush()
        await self.stack.aclose()


if __name__ == "__main__":
    main(RawSqs)
