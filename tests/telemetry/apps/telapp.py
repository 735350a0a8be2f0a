"""An app for the telemetry CLI tests: the broker comes from ``--broker``, the queue from
``TELAPP_QUEUE`` (a test's own: RabbitMQ has no key prefix to keep tests apart)."""

from __future__ import annotations

import os

import aioworkers

app = aioworkers.App("memory://", queue=os.environ.get("TELAPP_QUEUE", "default"))


@app.task(retries=0)
async def ok(i: int) -> None:
    pass


@app.task(retries=0)
async def boom(i: int) -> None:
    raise RuntimeError("boom")
