"""Consumers of a Redis stream another application XADDs to (decode="fields"), in a worker
subprocess: what it gets, a retry's attempt, and redelivery after a SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

import aioworkers

from ..services import REDIS, REDIS_URL, delete_prefix, ensure
from ._wait import until

ROOT = Path(__file__).resolve().parents[2]


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.prefix = f"t-consumer-{uuid.uuid4().hex[:8]}"
        self.url = f"{REDIS_URL}?prefix={self.prefix}"
        self.ledger = f"{self.prefix}:ledger"
        self.stream = f"{self.prefix}:{{clicks}}:stream"  # the documented stream key
        self.redis = aioredis.Redis.from_url(REDIS_URL)
        self.tmp = tmp_path
        self.procs: list[asyncio.subprocess.Process] = []

    async def worker(self, visibility: float) -> asyncio.subprocess.Process:
        env = dict(os.environ, CLICKS_BROKER_URL=self.url, CLICKS_LEDGER=self.ledger)
        env |= {"CLICKS_VISIBILITY": str(visibility), "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "aioworkers", "run", "tests.consumers.apps.clicks:app"]
        with (self.tmp / f"w{len(self.procs)}.log").open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.procs.append(proc)
        return proc

    async def seen(self) -> list[dict[str, Any]]:
        return [orjson.loads(x) for x in await self.redis.lrange(self.ledger, 0, -1)]

    async def aclose(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await self.redis.aclose()
        await delete_prefix(self.prefix)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    ensure(REDIS)
    w = World(tmp_path)
    try:
        yield w
    finally:
        await w.aclose()


async def test_fields_then_redelivery_after_sigkill(world: World) -> None:
    # Written before any worker ran: the group reads the stream from its start.
    await world.redis.xadd(world.stream, {"user": "7", "page": "/home"})
    await world.redis.xadd(world.stream, {"user": "8", "hang": "yes"})
    first = await world.worker(visibility=1.0)

    async def both_seen() -> bool:
        return len(await world.seen()) == 2

    await until(both_seen, 20)

    async def only_the_hanging_one_pending() -> bool:
        # User 7's ack is batched: a kill before it is sent redelivers user 7 too (at least
        # once, as documented), which is not what this test is about.
        summary = await world.redis.xpending(world.stream, "workers")
        return int(summary["pending"]) == 1

    await until(only_the_hanging_one_pending, 20)
    first.send_signal(signal.SIGKILL)  # while it hangs on user 8
    await first.wait()
    await world.worker(visibility=1.0)

    async def redelivered() -> bool:
        # >= 3: a redelivery beyond the one expected must fail the assertion below, not
        # time out here.
        return len(await world.seen()) >= 3

    # Redelivered once the killed worker's lease (1 s, the visibility timeout) runs out.
    await until(redelivered, 20)
    seen = await world.seen()
    assert sorted((s["body"]["user"], s["count"]) for s in seen) == [
        ("7", 1),
        ("8", 1),
        ("8", 2),
    ]
    assert seen[0]["body"] in ({"user": "7", "page": "/home"}, {"user": "8", "hang": "yes"})


async def test_retry_keeps_the_fields_and_counts_the_attempt(world: World) -> None:
    await world.redis.xadd(world.stream, {"user": "9", "fail": "1"})
    await world.worker(visibility=30.0)
    app = aioworkers.App(world.url)

    async def dead() -> bool:
        return len(await app.dlq("clicks").list()) == 1

    await until(dead, 30)
    (letter,) = await app.dlq("clicks").list()
    await app.aclose()
    seen = await world.seen()
    assert [(s["body"], s["attempt"]) for s in seen] == [
        ({"user": "9", "fail": "1"}, 1),
        ({"user": "9", "fail": "1"}, 2),
    ]
    assert letter.reason == "max_retries"
    assert orjson.loads(letter.body) == {"user": "9", "fail": "1"}

    # `aioworkers dlq replay` puts the original fields back: attempt 1 again.
    env = dict(os.environ, CLICKS_BROKER_URL=world.url, CLICKS_LEDGER=world.ledger)
    argv = ["dlq", "replay", "tests.consumers.apps.clicks:app", "--queue", "clicks"]
    replay = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aioworkers", *argv, cwd=ROOT, env=env
    )
    assert await replay.wait() == 0

    async def replayed() -> bool:
        # >= 3: the replayed entry fails again and is retried at once, maybe before the
        # first look (the CLI's exit is awaited first), making 4 records.
        return len(await world.seen()) >= 3

    await until(replayed, 30)
    last = (await world.seen())[2]
    assert (last["body"], last["attempt"]) == ({"user": "9", "fail": "1"}, 1)
