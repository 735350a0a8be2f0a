"""The raw side: a plain redis.asyncio consumer loop doing the same work as aioworkers.

XREADGROUP COUNT <= 100 BLOCK for no more than the free slots, one asyncio task per
message (decode the envelope, call the handler it names), acks batched as XACK + XDEL in
one pipeline while the next batch accumulates. No leases, retries or fencing: the floor
that per-job client overhead sets. Imports no part of aioworkers.

    python benchmarks/_raw.py '<spec json>'    (started by run.py)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
import redis.asyncio as aioredis
from _child import Spec, Work, main

GROUP = "workers"
FETCH_MAX = 100
BLOCK_MS = 100
ACK_BATCH = 1000


class RawLoop:
    def __init__(self, spec: Spec, work: Work) -> None:
        self.client = aioredis.from_url(spec.redis_url)
        self.stream = spec.stream
        self.consumer = f"raw-{os.getpid()}"
        self.capacity = spec.concurrency
        self.handlers: dict[str, Callable[..., Coroutine[Any, Any, None]]] = work.handlers
        self.running = 0
        self.jobs: set[asyncio.Task[None]] = set()
        self.acks: list[bytes] = []
        self.ack_wake = asyncio.Event()
        self.ack_lock = asyncio.Lock()
        self.room = asyncio.Event()
        self.stopping = False
        self.fetcher: asyncio.Task[None] | None = None
        self.acker: asyncio.Task[None] | None = None

    async def start(self) -> asyncio.Task[None]:
        self.acker = asyncio.create_task(self._ack_loop())
        self.fetcher = asyncio.create_task(self._fetch_loop())
        return self.fetcher

    async def _fetch_loop(self) -> None:
        while not self.stopping:
            free = self.capacity - self.running
            if free <= 0:
                self.room.clear()
                await self.room.wait()
                continue
            reply: Any = await self.client.xreadgroup(
                GROUP, self.consumer, {self.stream: ">"}, count=min(FETCH_MAX, free), block=BLOCK_MS
            )
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    self.running += 1
                    job = asyncio.create_task(self._run(entry_id, fields[b"b"]))
                    self.jobs.add(job)  # the loop keeps only weak references to tasks
                    job.add_done_callback(self.jobs.discard)

    async def _run(self, entry_id: bytes, body: bytes) -> None:
        try:
            env = orjson.loads(body)
            await self.handlers[env["task"]](*env["args"], **env["kwargs"])
        finally:
            self.acks.append(entry_id)
            self.ack_wake.set()
            self.running -= 1
            self.room.set()

    async def _ack_loop(self) -> None:
        while True:
            await self.ack_wake.wait()
            self.ack_wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        async with self.ack_lock:
            while self.acks:
                batch = self.acks[:ACK_BATCH]
                del self.acks[:ACK_BATCH]
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.xack(self.stream, GROUP, *batch)
                    pipe.xdel(self.stream, *batch)
                    await pipe.execute()

    async def stop(self) -> None:
        self.stopping = True
        self.room.set()
        if self.fetcher is not None and not self.fetcher.done():
            await self.fetcher
        await asyncio.gather(*self.jobs)
        await self._flush()
        if self.acker is not None:
            self.acker.cancel()
        await self.client.aclose()


if __name__ == "__main__":
    main(RawLoop)
