"""The app the end-to-end tests run in worker subprocesses
(``python -m aioworkers run tests.e2e.ledger_app:app``), configured from the environment:

``E2E_BROKER_URL``      redis URL with the test's own ``?prefix=``; the ledger lives in the
                        same Redis under ``<prefix>:ledger:``
``E2E_VISIBILITY``      visibility timeout, seconds (default 30)
``E2E_MAX_DELIVERIES``  deliveries before a job is dead-lettered (default 5)
``E2E_JOB_SECONDS``     how long a ``work`` job sleeps unless told (default 0)
``E2E_QUEUE``           the app's default queue (default ``default``)
``E2E_LEDGER_URL``, ``E2E_PREFIX``  the ledger's Redis and key prefix when the broker is
                        not that Redis (default: taken from ``E2E_BROKER_URL``)

Idempotency keys, where the package has them, live in the same Redis under
``<prefix>:idem:``; the ``once`` task uses them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc

import aioworkers

from .ledger import RECORD, LedgerKeys

BROKER_URL = os.environ.get("E2E_BROKER_URL", "redis://127.0.0.1:6379/0?prefix=e2e")
VISIBILITY = float(os.environ.get("E2E_VISIBILITY", "30"))
MAX_DELIVERIES = int(os.environ.get("E2E_MAX_DELIVERIES", "5"))
JOB_SECONDS = float(os.environ.get("E2E_JOB_SECONDS", "0"))
# A ledger write keeps trying this long while Redis is away (the restart test).
WRITE_PATIENCE = 60.0

_url = urlsplit(BROKER_URL)
# On a broker that is not Redis (amqp://) the ledger's Redis and prefix are given apart.
LEDGER_URL = os.environ.get("E2E_LEDGER_URL") or urlunsplit(_url._replace(query=""))
PREFIX = os.environ.get("E2E_PREFIX") or dict(parse_qsl(_url.query)).get("prefix", "aioworkers")
KEYS = LedgerKeys(PREFIX)
PID = os.getpid()
IDEMPOTENCY = importlib.util.find_spec("aioworkers.idempotency") is not None

options: dict[str, Any] = {}
# On postgresql:// the keys live in the broker's database, the store's default.
if IDEMPOTENCY and _url.scheme not in ("postgresql", "postgres"):
    options["idempotency"] = f"{LEDGER_URL}?prefix={PREFIX}:idem"
app = aioworkers.App(
    BROKER_URL,
    queue=os.environ.get("E2E_QUEUE", "default"),
    visibility_timeout=VISIBILITY,
    max_deliveries=MAX_DELIVERIES,
    **options,
)
_ledger: dict[str, Any] = {}


@app.on_startup
async def _connect() -> None:
    client = aioredis.from_url(LEDGER_URL)
    _ledger["client"] = client
    _ledger["record"] = client.register_script(RECORD)


@app.on_shutdown
async def _disconnect() -> None:
    await _ledger.pop("client").aclose()


async def _patiently(write: Any) -> None:
    """Retry a ledger write while Redis is unreachable: the job's effect must land."""
    deadline = time.monotonic() + WRITE_PATIENCE
    while True:
        try:
            await write()
            return
        except (rexc.ConnectionError, rexc.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _start(job_id: str) -> int:
    """Record a run's start; returns how many runs of the job have started."""
    client = _ledger["client"]
    await _patiently(lambda: client.rpush(KEYS.starts, f"{job_id} {PID}"))
    runs: int = await client.hincrby(KEYS.runs_started, job_id, 1)
    return runs


async def _work(seconds: float | None, track: bool, redelivered: float | None) -> None:
    job = aioworkers.current_job()
    # What the effect is recorded under: the idempotency key where there is one.
    effect_id = job.key or job.id
    token = os.urandom(8).hex()
    if track and await _start(effect_id) > 1 and redelivered is not None:
        seconds = redelivered
    await asyncio.sleep(JOB_SECONDS if seconds is None else seconds)
    await _patiently(
        lambda: _ledger["record"](keys=KEYS.record_args(), args=[token, effect_id, PID])
    )


@app.task(retries=0)
async def work(
    seconds: float | None = None, track: bool = False, redelivered: float | None = None
) -> None:
    """Sleep ``seconds``, then record the effect: at the end, so a run cut short records
    nothing. A ``track``ed job records each start, and its later runs sleep ``redelivered``
    seconds if given."""
    await _work(seconds, track, redelivered)


if IDEMPOTENCY:

    @app.task(retries=0, idempotent=True)
    async def once(
        seconds: float | None = None, track: bool = False, redelivered: float | None = None
    ) -> None:
        """`work` under an idempotency key (the enqueue ``key``, else the job id)."""
        await _work(seconds, track, redelivered)


@app.task(retries=0)
async def die() -> None:
    """Kill the worker process running it: a poison job no handler error can catch."""
    await _start(aioworkers.current_job().id)
    os.kill(os.getpid(), signal.SIGKILL)
