"""The aioworkers side: the same handlers registered as tasks, run by a `Worker`.

python benchmarks/_aio.py '<spec json>'    (started by run.py)
"""

from __future__ import annotations

import asyncio

from _child import Spec, Work, main

import aioworkers


class AioWorker:
    def __init__(self, spec: Spec, work: Work) -> None:
        self.app = aioworkers.App(spec.broker_url, queue=spec.queue, concurrency=spec.concurrency)
        for name, handler in work.handlers.items():
            self.app.task(name)(handler)
        self.worker = self.app.worker(concurrency=spec.concurrency)
        self.running: asyncio.Task[None] | None = None

    async def start(self) -> asyncio.Task[None]:
        self.running = asyncio.create_task(self.worker.run())
        return self.running

    async def stop(self) -> None:
        self.worker.stop()
        if self.running is not None and not self.running.done():
            await self.running
        await self.app.aclose()


if __name__ == "__main__":
    main(AioWorker)
