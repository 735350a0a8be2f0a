"""The loop the polling raw sides share (`_raw.py`, `_raw_sqs.py`, `_raw_sqlite.py`).

Pollers fetch while slots are free, one asyncio task per message (decode the envelope,
call the handler it names), and an acker settles the finished messages in batches while
the next ones run. A side says how it fetches, how it settles a batch, its batch size and
how it closes. Imports no part of aioworkers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Generic, TypeVar

import orjson
from _child import Spec, Work

T = TypeVar("T")  # what settles one message: an entry id, a receipt handle, a row's lease


class RawLoop(Generic[T]):
    def __init__(self, spec: Spec, work: Work, *, ack_batch: int, pollers: int = 1) -> None:
        self.ack_batch = ack_batch  # tokens per `_settle`
        self.n_pollers = pollers
        self.capacity = spec.concurrency
        self.handlers: dict[str, Callable[..., Coroutine[Any, Any, None]]] = work.handlers
        self.running = 0
        self.jobs: set[asyncio.Task[None]] = set()
        self.acks: list[T] = []
        self.ack_wake = asyncio.Event()
        self.ack_lock = asyncio.Lock()
        self.room = asyncio.Event()
        self.stopping = False
        self.pollers: list[asyncio.Task[None]] = []
        self.acker: asyncio.Task[None] | None = None

    async def _fetch(self, free: int) -> Iterable[tuple[T, bytes | str]]:
        """At most ``free`` messages, as (token, body)."""
        raise NotImplementedError

    async def _settle(self, batch: list[T]) -> None:
        raise NotImplementedError

    async def start(self) -> asyncio.Task[None]:
        self.acker = asyncio.create_task(self._ack_loop())
        self.pollers = [asyncio.create_task(self._poll()) for _ in range(self.n_pollers)]
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
            for token, body in await self._fetch(free):
                self.running += 1
                job = asyncio.create_task(self._run(token, body))
                self.jobs.add(job)  # the loop keeps only weak references to tasks
                job.add_done_callback(self.jobs.discard)

    async def _run(self, token: T, body: bytes | str) -> None:
        try:
            env = orjson.loads(body)
            await self.handlers[env["task"]](*env["args"], **env["kwargs"])
        finally:
            self.acks.append(token)
            self.ack_wake.set()
            self.running -= 1
            self.room.set()

    async def _ack_loop(self) -> None:
        while True:
            await self.ack_wake.wait()
            self.ack_wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        async with self.ack_lock:  # stop's flush waits for the acker's
            while self.acks:
                batch = self.acks[: self.ack_batch]
                del self.acks[: self.ack_batch]
                await self._settle(batch)

    async def stop(self) -> None:
        """Stop fetching, finish the jobs, settle them; a side then closes its client."""
        self.stopping = True
        self.room.set()
        with contextlib.suppress(Exception):  # a poller that failed has ended the run already
            await asyncio.gather(*self.pollers)
        await asyncio.gather(*self.jobs)
        await self._flush()  # then cancel the acker: no batch of it is cut off
        if self.acker is not None:
            self.acker.cancel()
