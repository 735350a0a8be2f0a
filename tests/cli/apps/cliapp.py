"""An app for the CLI tests. ``CLIAPP_SEED`` jobs are enqueued when the worker starts,
because the memory:// broker cannot be reached from another process."""

from __future__ import annotations

import asyncio
import os
import sys

import aioworkers

app = aioworkers.App("memory://")


@app.task(retries=0)
async def nap(seconds: float) -> None:
    print(f"nap start {seconds}", flush=True)
    await asyncio.sleep(seconds)
    print(f"nap done {seconds}", flush=True)


@app.task(retries=0)
async def tidy(seconds: float) -> None:
    """Takes a moment to clean up when cancelled."""
    print(f"tidy start {seconds}", flush=True)
    try:
        await asyncio.sleep(seconds)
    finally:
        await asyncio.sleep(0.2)


@app.task(retries=0)
async def fail() -> None:
    raise RuntimeError("always fails")


@app.task(retries=0, queue="other")
async def fail_other() -> None:
    raise RuntimeError("fails on the other queue")


@app.on_startup
async def seed() -> None:
    for spec in filter(None, os.environ.get("CLIAPP_SEED", "").split(",")):
        name, _, arg = spec.partition("=")
        if name == "nap":
            await nap.enqueue(float(arg))
        elif name == "tidy":
            await tidy.enqueue(float(arg))
        elif name == "fail":
            await fail.enqueue()
        elif name == "later":  # a nap due in ``arg`` seconds
            await nap.options(delay=float(arg)).enqueue(0.01)
        elif name == "garbage":
            await app.broker.publish(app.queue, [b"\xff not json"])
    print("seeded", file=sys.stderr, flush=True)


not_an_app = 42
