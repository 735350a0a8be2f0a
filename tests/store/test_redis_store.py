"""The Redis store's own: where its keys live and how long, the ACL rules it needs, waits
that outlast an outage, errors when the server is away, and how soon a waiter wakes."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import pytest

from aioworkers.brokers._redis_io import ACL_RULES
from aioworkers.store import JobFinish, JobRecord, JobUpdate, StoreUnavailable
from aioworkers.store.redis import RedisStore

from ..proxy import Proxy
from ..services import REDIS, REDIS_URL, ensure
from .conftest import delete_keys

if TYPE_CHECKING:
    import redis.asyncio as aioredis


def _record(job_id: str, status: str = "running") -> JobRecord:
    return JobRecord(job_id, "send_email", "emails", status)  # type: ignore[arg-type]


@pytest.fixture
def prefix() -> str:
    return f"test-store-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(prefix: str) -> AsyncIterator[RedisStore]:
    ensure(REDIS)
    store = RedisStore(f"{REDIS_URL}?prefix={prefix}")
    try:
        yield store
    finally:
        await store.aclose()
        await delete_keys(prefix)


@pytest.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    ensure(REDIS)
    import redis.asyncio as aioredis

    client: aioredis.Redis = aioredis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


async def _everything(store: RedisStore, tag: str) -> None:
    """One call of each kind, leaving state of each kind behind."""
    assert await store.claim(f"{tag}:k", "a", lease=5) == "claimed"
    await store.put_job(_record(f"{tag}-job"), ttl=50)
    await store.finish_jobs([JobFinish(f"{tag}-job", "succeeded", ttl=50, finished_at=1.0)])
    assert (await store.wait_job(f"{tag}-job", timeout=1)) is not None
    assert await store.update_job(JobUpdate(f"{tag}-job", ttl=50, status="running")) == (
        "succeeded"
    )
    assert await store.mark_cancelled(f"{tag}-other", ttl=50) is True
    assert await store.cancelled([f"{tag}-other"]) == {f"{tag}-other"}
    assert await store.claim_slot("every-minute", "12:00", ttl=50) is True
    assert await store.hold_unique(f"{tag}-u", "job-1", ttl=50) is None
    assert await store.acquire_lease(f"{tag}-l", "a", limit=1, lease=5) is True
    assert await store.take(f"{tag}-b", rate=5, per=50) == 0.0
    beat = await store.beat(lease=5, claims=[(f"{tag}:k", "a")], leases=[(f"{tag}-l", "a")])
    assert (beat.lost_claims, beat.lost_leases) == ([], [])


async def test_every_key_lives_under_the_prefix_and_expires(
    store: RedisStore, prefix: str, client: aioredis.Redis
) -> None:
    await _everything(store, "t")
    keys = sorted([k.decode() async for k in client.scan_iter(match=f"{prefix}*")])
    assert keys == sorted(
        [
            f"{prefix}:t:k",
            f"{prefix}|job|t-job",
            f"{prefix}|end|t-job",
            f"{prefix}|cancel|t-other",
            f"{prefix}|slot|12:every-minute:12:00",
            f"{prefix}|unique|t-u",
            f"{prefix}|lease|t-l",
            f"{prefix}|bucket|t-b",
        ]
    )
    for key in keys:
        assert 0 < await client.pttl(key) <= 50_000, key


async def test_a_user_with_the_documented_acl_rules_can_do_everything(
    prefix: str, client: aioredis.Redis
) -> None:
    user = f"store-{uuid.uuid4().hex[:8]}"
    await client.execute_command("ACL", "SETUSER", user, "on", ">secret", f"~{prefix}*", *ACL_RULES)
    store = RedisStore(f"redis://{user}:secret@127.0.0.1:6379/0?prefix={prefix}")
    try:
        await _everything(store, "acl")
    finally:
        await store.aclose()
        await client.execute_command("ACL", "DELUSER", user)
        await delete_keys(prefix)


async def test_a_wait_outlasts_an_outage_and_a_restart(store: RedisStore, prefix: str) -> None:
    await store.put_job(_record("job"), ttl=60)
    async with Proxy("127.0.0.1", 6379) as proxy:
        through = RedisStore(f"redis://127.0.0.1:{proxy.port}/0?prefix={prefix}&socket_timeout=0.3")
        try:
            waiter = asyncio.create_task(through.wait_job("job", timeout=30))
            await asyncio.sleep(0.2)
            proxy.pause()  # a dead link: its calls time out as StoreUnavailable, retried
            await asyncio.sleep(1.0)
            await proxy.close_all()  # and the server "restarts"
            await store.finish_jobs([JobFinish("job", "succeeded", ttl=60, finished_at=1.0)])
            assert not waiter.done()
            proxy.resume()
            record = await asyncio.wait_for(waiter, 10)
            assert record is not None
            assert record.status == "succeeded"
        finally:
            await through.aclose()


async def test_a_wait_on_an_unreachable_server_ends_at_its_timeout() -> None:
    store = RedisStore("redis://:secret@127.0.0.1:1/0")
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            await store.wait_job("job", timeout=0.5)
        assert 0.4 < time.monotonic() - started < 3
        assert isinstance(info.value.__cause__, StoreUnavailable)
        assert "secret" not in str(info.value.__cause__)
    finally:
        await store.aclose()


async def test_every_call_to_an_unreachable_server_is_store_unavailable() -> None:
    # Port 1 refuses connections: every call fails fast with the transient error.
    store = RedisStore("redis://:secret@127.0.0.1:1/0")
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.put_job(_record("j"), ttl=1),
        lambda: store.get_job("j"),
        lambda: store.update_job(JobUpdate("j", ttl=1, status="running")),
        lambda: store.finish_jobs([JobFinish("j", "failed", ttl=1, finished_at=1.0)]),
        lambda: store.mark_cancelled("j", ttl=1),
        lambda: store.cancelled(["j"]),
        lambda: store.claim_slot("n", "s", ttl=1),
        lambda: store.hold_unique("u", "j", ttl=1),
        lambda: store.free_unique("u", "j"),
        lambda: store.acquire_lease("l", "a", limit=1, lease=1),
        lambda: store.extend_leases([("l", "a")], lease=1),
        lambda: store.release_lease("l", "a"),
        lambda: store.take("b", rate=1, per=1),
        lambda: store.beat(lease=1, claims=[("k", "a")], watch=["j"]),
    ]
    try:
        async with asyncio.timeout(10):
            for call in calls:
                with pytest.raises(StoreUnavailable) as info:
                    await call()
                assert "secret" not in str(info.value)
    finally:
        await store.aclose()


async def test_a_waiter_wakes_within_50_ms_of_the_end(prefix: str) -> None:
    # A real-time measure on purpose: the bound (p99 under 50 ms on Redis) is
    # about the blocking wake-up, which no fake clock exercises.
    ensure(REDIS)
    url = f"{REDIS_URL}?prefix={prefix}"
    ender, waiting = RedisStore(url), RedisStore(url)
    latencies = []
    try:
        for n in range(100):
            job = f"job-{n}"
            await ender.put_job(_record(job), ttl=60)
            waiter = asyncio.create_task(waiting.wait_job(job, timeout=10))
            await asyncio.sleep(0.003)  # blocked by now
            await ender.finish_jobs([JobFinish(job, "succeeded", ttl=60, finished_at=1.0)])
            ended = time.perf_counter()
            await waiter
            latencies.append(time.perf_counter() - ended)
    finally:
        await ender.aclose()
        await waiting.aclose()
        await delete_keys(prefix)
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 0.05, f"p99 {p99 * 1000:.1f} ms"
