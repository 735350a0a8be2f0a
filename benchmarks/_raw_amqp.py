"""The raw side on RabbitMQ: a plain aio-pika consumer doing the same work as aioworkers.

One consumer with prefetch = the concurrency (100; W2: 500), one asyncio task per
message (decode the envelope, call the handler it names), one ack per message. No
leases, retries, delivery counts or dead letters. Imports no part of aioworkers.

    python benchmarks/_raw_amqp.py '<spec json>'    (started by run.py --broker amqp)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import aio_pika
import orjson
from _child import Spec, Work, main
from aio_pika.abc import AbstractIncomingMessage


class RawAmqp:
    def __init__(self, spec: Spec, work: Work) -> None:
        self.url = spec.raw_url
        self.queue_name = spec.stream
        self.prefetch = spec.concurrency
        self.handlers: dict[str, Callable[..., Coroutine[Any, Any, None]]] = work.handlers
        self.jobs: set[asyncio.Task[None]] = set()
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.queue: aio_pika.abc.AbstractQueue | None = None
        self.tag: str | None = None
        self.closed = asyncio.Event()

    async def start(self) -> asyncio.Task[None]:
        self.connection = await aio_pika.connect(self.url)
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        self.queue = await channel.declare_queue(self.queue_name, durable=True)
        self.tag = await self.queue.consume(self._on_message, no_ack=False)
        return asyncio.create_task(self.closed.wait())

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        job = asyncio.create_task(self._run(message))
        self.jobs.add(job)  # the loop keeps only weak references to tasks
        job.add_done_callback(self.jobs.discard)

    async def _run(self, message: AbstractIncomingMessage) -> None:
        try:
            env = orjson.loads(message.body)
            await self.handlers[env["task"]](*env["args"], **env["kwargs"])
        finally:
            await message.ack()

    async def stop(self) -> None:
        if self.queue is not None and self.tag is not None:
            await self.queue.cancel(self.tag)
        await asyncio.gather(*self.jobs)
        if self.connection is not None:
            await self.connection.close()
        self.closed.set()


if __name__ == "__main__":
    main(RawAmqp)
