"""Sync handlers and typed arguments through a real worker process on Redis: blocking
sync jobs beside async ones never use more than ``sync_threads`` threads, arguments
arrive as their annotated types, and a worker stopped with SIGTERM drains its threads."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from ..e2e.harness import wait_until
from ..services import REDIS, delete_prefix, ensure

ROOT = Path(__file__).resolve().parents[2]
JOBS = 30


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    ensure(REDIS)
    name = f"awtest-h17-{uuid.uuid4().hex[:8]}"
    yield name
    await delete_prefix(name)


async def test_sync_and_typed_jobs_on_a_real_worker(
    prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AW_TEST_PREFIX", prefix)  # the app module reads it on import
    sys.modules.pop("tests.handlers.apps.typed_sync", None)
    from .apps import typed_sync

    app = typed_sync.app
    Line = typed_sync.Line
    at = datetime.datetime(2025, 3, 1, 9, 30, tzinfo=datetime.UTC)
    ids = [uuid.uuid4() for _ in range(JOBS)]
    calls = [typed_sync.invoice.call(i, at, Decimal("10.05"), [Line("a", 2)]) for i in ids]
    calls += [typed_sync.ping.call(datetime.date(2025, 3, 1)) for _ in range(JOBS)]
    await app.enqueue_many(calls)
    await app.aclose()

    log = tmp_path / "worker.log"
    env = {**os.environ, "AW_TEST_PREFIX": prefix}
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aioworkers", "run", "tests.handlers.apps.typed_sync:app",
            "--concurrency", "20", cwd=ROOT, env=env, stdout=out, stderr=out,
        )  # fmt: skip
    client = aioredis.Redis(host="127.0.0.1", port=6379)
    try:

        async def all_seen() -> bool:
            return int(await client.llen(f"{prefix}:seen")) == 2 * JOBS

        await wait_until(all_seen, within=30, what=f"{2 * JOBS} jobs")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, log.read_text()
        seen = [orjson.loads(x) for x in await client.lrange(f"{prefix}:seen", 0, -1)]
        torn_down = int(await client.get(f"{prefix}:torn_down") or 0)
        middleware = int(await client.get(f"{prefix}:middleware") or 0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await client.aclose()

    invoices = [s for s in seen if s["task"] == "invoice"]
    pings = [s for s in seen if s["task"] == "ping"]
    assert sorted(s["values"][0] for s in invoices) == sorted(map(str, ids))
    assert {tuple(s["types"]) for s in invoices} == {("UUID", "datetime", "Decimal", "Line")}
    for s in invoices:
        assert s["values"][1:] == [at.isoformat(), "10.05", [{"sku": "a", "qty": 2}]]
    assert max(s["running"] for s in invoices) <= 3  # sync_threads=3, concurrency 20
    assert len({s["thread"] for s in invoices}) <= 3
    assert {tuple(s["types"]) for s in pings} == {("date",)}
    assert torn_down == JOBS
    assert middleware == 2 * JOBS
    text = log.read_text()
    assert "ok=60 retried=0 dead=0" in text, text[-2000:]
