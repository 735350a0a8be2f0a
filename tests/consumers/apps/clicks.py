"""A worker app for tests/consumers/test_redis.py: a consumer of a Redis stream another
client XADDs to. Every handled entry is recorded in Redis; an entry with ``hang`` set
hangs (until its worker is killed) on its first delivery."""

from __future__ import annotations

import asyncio
import os

import orjson
import redis.asyncio as aioredis

import aioworkers

URL = os.environ["CLICKS_BROKER_URL"]
LEDGER = os.environ["CLICKS_LEDGER"]

app = aioworkers.App(URL, visibility_timeout=float(os.environ.get("CLICKS_VISIBILITY", "30")))
ledger = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")


@app.consumer("clicks", decode="fields", retries=1, backoff=0.05)
async def on_click(body: dict[str, str], message: aioworkers.Message) -> None:
    seen = {"body": body, "count": message.delivery_count, "attempt": message.attempt}
    await ledger.rpush(LEDGER, orjson.dumps(seen))
    if body.get("hang") and message.delivery_count == 1:
        await asyncio.sleep(3600)
    if body.get("fail"):
        raise RuntimeError("failing on purpose")
