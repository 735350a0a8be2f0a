"""The app the flow-control tests run in worker subprocesses
(``python -m aioworkers run tests.limits.flow_app:app``), configured from the environment:

``FLOW_BROKER_URL``  the broker (redis with the test's ``?prefix=``, sqlite, amqp)
``FLOW_STORE_URL``   the state store (Redis, with the test's prefix)
``FLOW_LEDGER_URL``  the Redis of the ledger; ``FLOW_PREFIX`` its key prefix
``FLOW_QUEUE``       the app's queue (default ``default``)
``FLOW_VISIBILITY``  the visibility timeout, which is also a slot's lease (default 30)

The ledger counts what runs: per limit key, how many run now and the most that ever ran
at once (one Lua script, so the count is exact across processes), and every start with
the Redis server's time and the job's attempt.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import redis.asyncio as aioredis

import aioworkers

BROKER_URL = os.environ.get("FLOW_BROKER_URL", "memory://")
STORE_URL = os.environ.get("FLOW_STORE_URL", "memory://")
LEDGER_URL = os.environ.get("FLOW_LEDGER_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("FLOW_PREFIX", "flow")
VISIBILITY = float(os.environ.get("FLOW_VISIBILITY", "30"))

# KEYS: running, peak, starts. ARGV: attempt, what -> running now
ENTER = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
local t = redis.call('TIME')
redis.call('RPUSH', KEYS[3], t[1] .. '.' .. string.format('%06d', t[2]) .. ' ' .. ARGV[1]
  .. ' ' .. ARGV[2])
return n
"""

app = aioworkers.App(
    BROKER_URL,
    store=STORE_URL,
    queue=os.environ.get("FLOW_QUEUE", "default"),
    visibility_timeout=VISIBILITY,
)
_ledger: dict[str, Any] = {}


def key(name: str) -> str:
    return f"{PREFIX}:ledger:{name}"


@app.on_startup
async def _connect() -> None:
    client = aioredis.from_url(LEDGER_URL)
    _ledger["client"] = client
    _ledger["enter"] = client.register_script(ENTER)


@app.on_shutdown
async def _disconnect() -> None:
    await _ledger.pop("client").aclose()


async def _run(limit_key: str, seconds: float, what: str = "") -> None:
    """Count the run in while it sleeps ``seconds``, then out, then count it done."""
    client = _ledger["client"]
    attempt = aioworkers.current_job().attempt
    keys = [key(f"running:{limit_key}"), key(f"peak:{limit_key}"), key(f"starts:{limit_key}")]
    await _ledger["enter"](keys=keys, args=[attempt, what])
    try:
        await asyncio.sleep(seconds)
    finally:
        await client.decr(key(f"running:{limit_key}"))
    await client.incr(key("done"))


@app.task(concurrency=3)
async def capped(n: int, seconds: float) -> None:
    await _run("capped", seconds)


@app.task(concurrency=2, limit_key="tenant")
async def per_tenant(tenant: str, n: int, seconds: float) -> None:
    await _run(f"tenant:{tenant}", seconds)


@app.task(rate_limit="20/s")
async def paced(n: int) -> None:
    await _run("paced", 0.0)


@app.task(rate_limit="10/s", limit_key="partner", retries=0)
async def partner(partner: str, n: int, pause: float) -> None:
    """The first run of job 0 is told "429, retry after ``pause``"."""
    if n == 0 and await _ledger["client"].incr(key("partner-429")) == 1:
        await _run(f"partner:{partner}", 0.0, "429")
        raise aioworkers.RateLimited(retry_after=pause)
    await _run(f"partner:{partner}", 0.0, str(n))


@app.task(concurrency=2)
async def hog(n: int, seconds: float) -> None:
    """Holds a slot ``seconds``; run again (its worker was killed), it ends at once."""
    ran_before = not await _ledger["client"].set(
        key(f"hog:{aioworkers.current_job().id}"), 1, nx=True
    )
    if ran_before:
        seconds = 0.0
    await _run("hog", seconds, str(os.getpid()))


@app.task
async def prio(queue: str, seconds: float) -> None:
    await _run("prio", seconds, queue)
