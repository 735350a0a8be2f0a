"""A worker app as a Celery or arq user writes it: sync tasks doing blocking I/O beside
async ones, typed arguments, a middleware and a dependency. Each job records what its
handler saw in Redis (``<prefix>:seen``), so the test reads it from another process.

``AW_TEST_PREFIX`` names the queue prefix and keys of the test."""

from __future__ import annotations

import dataclasses
import datetime
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

import aioworkers

PREFIX = os.environ["AW_TEST_PREFIX"]
app = aioworkers.App(f"redis://127.0.0.1:6379/0?prefix={PREFIX}", sync_threads=3)


@dataclasses.dataclass
class Line:
    sku: str
    qty: int


def record(**fields: Any) -> None:
    """What a handler saw, from a thread: a blocking client, as a sync codebase has."""
    with redis.Redis(host="127.0.0.1", port=6379) as client:
        client.rpush(f"{PREFIX}:seen", orjson.dumps(fields))


@app.on_startup
async def connect() -> None:
    app.state.redis = aioredis.Redis(host="127.0.0.1", port=6379)


@app.on_shutdown
async def disconnect() -> None:
    await app.state.redis.aclose()


async def get_conn() -> AsyncIterator[aioredis.Redis]:
    yield app.state.redis
    await app.state.redis.incr(f"{PREFIX}:torn_down")


@app.middleware
async def count_running(job: aioworkers.Job, call_next: Any) -> Any:
    await app.state.redis.incr(f"{PREFIX}:middleware")
    return await call_next()


@app.task(timeout=10)
def invoice(order_id: uuid.UUID, at: datetime.datetime, total: Decimal, lines: list[Line]) -> None:
    running = int(redis.Redis(host="127.0.0.1", port=6379).incr(f"{PREFIX}:running"))
    try:
        time.sleep(0.05)  # blocking I/O
        record(
            task="invoice",
            thread=threading.current_thread().name,
            running=running,
            job=aioworkers.current_job().id,
            types=[type(order_id).__name__, type(at).__name__, type(total).__name__]
            + [type(line).__name__ for line in lines],
            values=[
                str(order_id),
                at.isoformat(),
                str(total),
                [dataclasses.asdict(x) for x in lines],
            ],
        )
    finally:
        redis.Redis(host="127.0.0.1", port=6379).decr(f"{PREFIX}:running")


@app.task
async def ping(day: datetime.date, conn: aioredis.Redis = aioworkers.Depends(get_conn)) -> None:
    await conn.rpush(
        f"{PREFIX}:seen", orjson.dumps({"task": "ping", "types": [type(day).__name__]})
    )
