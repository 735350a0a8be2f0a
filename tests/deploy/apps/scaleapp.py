"""The app the deployment tests run under the supervisor
(``python -m aioworkers run scaleapp:app --processes N`` from this directory).

``DEPLOY_BROKER_URL``  redis URL with the test's own ``?prefix=``; the ledger lives in the
                       same Redis under ``<prefix>:ledger:``
``DEPLOY_LEDGER_URL``, ``DEPLOY_PREFIX``  the ledger's Redis and prefix when the broker is
                       not that Redis (a ``sqlite://`` file)
``DEPLOY_VISIBILITY``  visibility timeout, seconds (default 30)
"""

from __future__ import annotations

import asyncio
import os
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis.asyncio as aioredis

import aioworkers

BROKER_URL = os.environ.get("DEPLOY_BROKER_URL", "redis://127.0.0.1:6379/0?prefix=deploy")
_url = urlsplit(BROKER_URL)
LEDGER_URL = os.environ.get("DEPLOY_LEDGER_URL") or urlunsplit(_url._replace(query=""))
PREFIX = os.environ.get("DEPLOY_PREFIX") or dict(parse_qsl(_url.query)).get("prefix", "aioworkers")

app = aioworkers.App(
    BROKER_URL, visibility_timeout=float(os.environ.get("DEPLOY_VISIBILITY", "30"))
)
_ledger: dict[str, Any] = {}
_leaked: list[bytes] = []


def ledger_key(name: str) -> str:
    return f"{PREFIX}:ledger:{name}"


@app.on_startup
async def _connect() -> None:
    _ledger["client"] = aioredis.from_url(LEDGER_URL)


@app.on_shutdown
async def _disconnect() -> None:
    await _ledger.pop("client").aclose()


@app.task(retries=3)
async def work(seconds: float, leak_mb: int = 0) -> None:
    """Sleep, keep ``leak_mb`` MB for good (a leaking task), then record the job as done:
    at the end, so a run cut short records nothing."""
    await asyncio.sleep(seconds)
    if leak_mb:
        _leaked.append(b"\x01" * (leak_mb * 2**20))  # written, so resident
    job_id = aioworkers.current_job().id
    pipe = _ledger["client"].pipeline(transaction=True)
    pipe.sadd(ledger_key("done"), job_id)
    pipe.hincrby(ledger_key("runs"), job_id, 1)
    pipe.sadd(ledger_key("pids"), os.getpid())
    await pipe.execute()
