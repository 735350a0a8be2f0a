"""End to end: the push app served by uvicorn in a subprocess, pushes over real HTTP,
settled through the app's broker (dead letters) and store (idempotency keys), on a Redis
and a SQLite app."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis

import aioworkers
from aioworkers import push

from ..services import REDIS, delete_prefix, ensure

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "e2e-" + secrets.token_hex(8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Served:
    url: str
    prefix: str
    app: aioworkers.App
    client: httpx.AsyncClient
    redis: redis.Redis

    async def effects(self, tag: str) -> int:
        value = await self.redis.get(f"{self.prefix}:effect:{tag}")
        return int(value or 0)

    def request(self, call: aioworkers.Call | bytes, **kw: object) -> httpx.Request:
        return push.publish_request(self.app, call, url=self.url, token=TOKEN, **kw)  # type: ignore[arg-type]


@pytest.fixture(params=["redis", "sqlite"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    ensure(REDIS)  # the effects are counted in Redis either way
    prefix = "pushe2e" + secrets.token_hex(4)
    if request.param == "redis":
        yield f"redis://127.0.0.1:6379/0?prefix={prefix}"
    else:
        yield f"sqlite:///{tmp_path / 'jobs.db'}?prefix={prefix}"


@pytest.fixture
def server(broker_url: str) -> Iterator[tuple[str, str]]:
    prefix = broker_url.rsplit("prefix=", 1)[1]
    port = free_port()
    env = {
        **os.environ,
        "PUSH_TEST_PREFIX": prefix,
        "PUSH_TEST_TOKEN": TOKEN,
        "PUSH_TEST_BROKER": broker_url.split("?")[0] if "sqlite" in broker_url else broker_url,
    }
    command = [sys.executable, "-m", "uvicorn", "tests.push.served:push", "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--log-level", "warning"], cwd=ROOT, env=env, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.1)
        yield url, prefix
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.fixture
async def served(server: tuple[str, str], broker_url: str) -> AsyncIterator[Served]:
    url, prefix = server
    app = aioworkers.App(broker_url.split("?")[0] if "sqlite" in broker_url else broker_url)
    app.task(name="record")(_record)
    app.task(name="fails")(_fails)
    conn = redis.Redis(host="127.0.0.1", port=6379)
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        yield Served(url, prefix, app, client, conn)
    await app.aclose()
    await conn.aclose()
    await delete_prefix(prefix)


async def _record(tag: str) -> None: ...


async def _fails(tag: str) -> None: ...


async def test_pushes_over_http_settle_as_their_status_codes_promise(served: Served) -> None:
    client = served.client
    # 200 concurrent pushes of distinct jobs: each runs exactly once.
    requests = [served.request(aioworkers.Call("record", (f"j{i}",))) for i in range(200)]
    replies = await asyncio.gather(*(client.send(r) for r in requests))
    assert [r.status_code for r in replies] == [204] * 200
    # The platform pushes 30 of them again, concurrently: acked, not run again.
    again = await asyncio.gather(*(client.send(r) for r in requests[:30]))
    assert {r.status_code for r in again} == {200}
    counts = [await served.effects(f"j{i}") for i in range(200)]
    assert counts == [1] * 200

    # A failing job: 503 while the platform's attempt is within the retries, then acked
    # with its dead letter in the broker's DLQ.
    job, _ = push.envelope(served.app, aioworkers.Call("fails", ("f",)))
    codes = [
        (await client.send(served.request(job, attempt=a, platform=p))).status_code
        for a, p in ((1, "pubsub"), (2, "cloudtasks"), (3, "pubsub"))
    ]
    assert codes == [503, 503, 200]
    garbage = await client.post(
        f"{served.url}/pubsub",
        content=b"{not json",
        headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
    )
    assert garbage.status_code == 200
    wrong = served.request(aioworkers.Call("record", ("intruder",)))
    wrong.headers["authorization"] = "Bearer nope"
    assert (await client.send(wrong)).status_code == 401

    letters = await served.app.broker.dead_letters("default")  # type: ignore[attr-defined]
    assert sorted(x.reason for x in letters) == ["decode_error", "max_retries"]
    (failed,) = [x for x in letters if x.reason == "max_retries"]
    assert failed.error is not None
    assert "boom f" in failed.error
    assert await served.effects("f") == 3
    assert await served.effects("intruder") == 0
