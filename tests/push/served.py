"""The push app the end-to-end test serves with uvicorn: a Redis app (or the broker URL
in PUSH_TEST_BROKER) whose effects are counters in Redis (``<prefix>:effect:<tag>``), so
the test process can count them."""

from __future__ import annotations

import os

import redis.asyncio as redis

import aioworkers

PREFIX = os.environ["PUSH_TEST_PREFIX"]
app = aioworkers.App(
    os.environ.get("PUSH_TEST_BROKER", f"redis://127.0.0.1:6379/0?prefix={PREFIX}")
)
_redis = redis.Redis(host="127.0.0.1", port=6379)


@app.task
async def record(tag: str) -> None:
    await _redis.incr(f"{PREFIX}:effect:{tag}")


@app.task(retries=2, backoff=0.1)
async def fails(tag: str) -> None:
    await _redis.incr(f"{PREFIX}:effect:{tag}")
    raise RuntimeError(f"boom {tag}")


push = aioworkers.push_app(
    app, auth=aioworkers.push.bearer_token(os.environ["PUSH_TEST_TOKEN"]), max_concurrency=500
)
