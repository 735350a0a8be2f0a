"""The raw side: a plain redis.asyncio consumer loop doing the same work as aioworkers.

XREADGROUP COUNT <= 100 BLOCK for no more than the free slots, one asyncio task per
message (decode the envelope, call the handler it names), acks batched as XACK + XDEL in
one pipeline while the next batch accumulates (the loop is `_rawloop.py`'s). No leases,
retries or fencing: the floor that per-job client overhead sets. Imports no part of
aioworkers.

    python benchmarks/_raw.py '<spec json>'    (started by run.py)
"""

from __future__ import annotations

import os
from typing import Any

import redis.asyncio as aioredis
from _child import Spec, Work, main
from _rawloop import RawLoop

GROUP = "workers"
FETCH_MAX = 100
BLOCK_MS = 100


class RawRedis(RawLoop[bytes]):
    def __init__(self, spec: Spec, work: Work) -> None:
        super().__init__(spec, work, ack_batch=1000)
        self.client = aioredis.from_url(spec.redis_url)
        self.stream = spec.stream
        self.consumer = f"raw-{os.getpid()}"

    async def _fetch(self, free: int) -> list[tuple[bytes, bytes]]:
        reply: Any = await self.client.xreadgroup(
            GROUP, self.consumer, {self.stream: ">"}, count=min(FETCH_MAX, free), block=BLOCK_MS
        )
        return [
            (entry_id, fields[b"b"])
            for _stream, entries in reply or ()
            for entry_id, fields in entries
        ]

    async def _settle(self, batch: list[bytes]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xack(self.stream, GROUP, *batch)
            pipe.xdel(self.stream, *batch)
            await pipe.execute()

    async def stop(self) -> None:
        await super().stop()
        await self.client.aclose()


if __name__ == "__main__":
    main(RawRedis)
