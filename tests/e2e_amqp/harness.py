"""The Redis end-to-end harness (`tests.e2e.harness`) on ``amqp://``: worker subprocesses
consume from the local RabbitMQ, each test on a queue of its own; the ledger stays in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import aiormq

import aioworkers
from aioworkers import BrokerUnavailable

from ..e2e.harness import E2E
from ..services import AMQP_URL, REDIS, delete_amqp_queues

REDIS_URL = f"redis://{REDIS.host}:{REDIS.port}/0"


class AmqpE2E(E2E):
    """`E2E` with an AMQP broker: ``queue`` (the app's default queue) is the test's own and
    is deleted afterwards, with its DLQ and the delay queues named in ``queues``."""

    def __init__(self, workdir: Path) -> None:
        self.queue = f"e2e-{uuid.uuid4().hex[:12]}"
        super().__init__(REDIS_URL, workdir)
        self.broker_url = AMQP_URL
        self.extra_env = {
            "E2E_LEDGER_URL": REDIS_URL,
            "E2E_PREFIX": self.prefix,
            "E2E_QUEUE": self.queue,
        }
        self.queues = {self.queue, f"{self.queue}.dead"}

    def client(self, *, visibility: float = 30.0) -> aioworkers.App:
        app = aioworkers.App(AMQP_URL, queue=self.queue, visibility_timeout=visibility)
        self._apps.append(app)
        return app

    async def depth(self, queue: str = "default") -> aioworkers.QueueDepth:
        queue = self.queue if queue == "default" else queue
        try:
            return await self.app.stats(queue)
        except BrokerUnavailable:  # the test closed every connection: once more
            return await self.app.stats(queue)

    async def consumers(self) -> int:
        """How many consumers RabbitMQ has on the test's queue."""
        conn = await aiormq.connect(AMQP_URL)
        try:
            ok = await (await conn.channel()).queue_declare(self.queue, passive=True)
            return int(ok.consumer_count or 0)
        finally:
            await conn.close()

    async def aclose(self, *, delete_keys: bool = True) -> None:
        try:
            await super().aclose(delete_keys=delete_keys)
        finally:
            with contextlib.suppress(Exception):
                await delete_amqp_queues(self.queues | await self._delay_queues())

    async def _delay_queues(self) -> set[str]:
        """The delay queues the workers declared (retries, deferrals) for the test's queue."""
        proc = await asyncio.create_subprocess_exec(
            "rabbitmqctl",
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        return {n for n in out.decode().split() if n.startswith(f"{self.queue}.delay.")}
