"""An app for the telemetry CLI tests: the broker comes from ``--broker``."""

from __future__ import annotations

import aioworkers

app = aioworkers.App("memory://")


@app.task(retries=0)
async def ok(i: int) -> None:
    pass


@app.task(retries=0)
async def boom(i: int) -> None:
    raise RuntimeError("boom")
