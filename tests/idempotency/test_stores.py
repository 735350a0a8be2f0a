"""The store conformance suite: every `IdempotencyStore` passes the same tests, the memory
store in-process and the Redis store against the real local server.

The clock-free tables of the unit tests run here too; what needs time to pass (leases
lapsing, TTLs running out) uses short real leases. Each Redis test has its own key prefix
and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from aioworkers import App, QueueDepth
from aioworkers.errors import ConfigError
from aioworkers.idempotency import IdempotencyStore, MemoryStore, StoreUnavailable, open_store

from ..services import REDIS, REDIS_URL, delete_prefix, ensure
from ..unit.test_idempotency_memory import CASES, Clock, Step, play

if TYPE_CHECKING:
    import redis.asyncio as aioredis

LEASE = 0.2  # short real leases: long enough for a few calls, short enough to wait out


@pytest.fixture
def prefix() -> str:
    return f"test-idem-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["memory", "redis", "sqlite"])
async def store(
    request: pytest.FixtureRequest, prefix: str, tmp_path: Path
) -> AsyncIterator[IdempotencyStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "sqlite":
        from aioworkers.idempotency.sqlite import SqliteStore

        async with SqliteStore(f"sqlite:///{tmp_path}/keys.db") as sqlite_store:
            yield sqlite_store
        return
    ensure(REDIS)
    from aioworkers.idempotency.redis import RedisStore

    redis_store = RedisStore(f"{REDIS_URL}?prefix={prefix}")
    try:
        yield redis_store
    finally:
        await redis_store.aclose()
        await delete_prefix(prefix)


CLOCK_FREE = {name: steps for name, steps in CASES.items() if all(s[0] != "tick" for s in steps)}


@pytest.mark.parametrize("steps", list(CLOCK_FREE.values()), ids=list(CLOCK_FREE))
async def test_table(store: IdempotencyStore, steps: list[Step]) -> None:
    await play(store, Clock(), steps)


async def test_a_claim_lapses_after_its_lease(store: IdempotencyStore) -> None:
    assert await store.claim("k", "a", lease=LEASE) == "claimed"
    assert await store.claim("k", "b", lease=LEASE) == "busy"
    await asyncio.sleep(LEASE + 0.05)
    assert await store.complete("k", "a", ttl=60) is False
    assert await store.claim("k", "b", lease=LEASE) == "claimed"


async def test_extend_keeps_a_claim_alive(store: IdempotencyStore) -> None:
    assert await store.claim("k", "a", lease=LEASE) == "claimed"
    for _ in range(4):  # 0.4 s in all, twice the first lease
        await asyncio.sleep(LEASE / 2)
        assert await store.extend([("k", "a")], lease=LEASE) == []
    assert await store.claim("k", "b", lease=LEASE) == "busy"
    assert await store.complete("k", "a", ttl=60) is True
    assert await store.claim("k", "b", lease=LEASE) == "done"


async def test_a_done_key_lapses_after_its_ttl(store: IdempotencyStore) -> None:
    assert await store.claim("k", "a", lease=60) == "claimed"
    assert await store.complete("k", "a", ttl=LEASE) is True
    assert await store.claim("k", "b", lease=60) == "done"
    await asyncio.sleep(LEASE + 0.05)
    assert await store.claim("k", "b", lease=60) == "claimed"


async def test_concurrent_claims_have_one_winner(store: IdempotencyStore) -> None:
    results = await asyncio.gather(*(store.claim("k", f"o{i}", lease=60) for i in range(50)))
    assert sorted(results) == ["busy"] * 49 + ["claimed"]
    winner = f"o{results.index('claimed')}"
    completes = await asyncio.gather(*(store.complete("k", f"o{i}", ttl=60) for i in range(50)))
    assert completes.count(True) == 1
    assert completes[int(winner[1:])] is True


async def test_keys_with_odd_characters(store: IdempotencyStore) -> None:
    # Keys come from users: spaces, colons, braces, unicode and glob characters are data.
    keys = ["a b", "x:y:z", "{tag}", "ключ", "*", "k?[1]", ""]
    for key in keys:
        assert await store.claim(key, "a", lease=60) == "claimed"
    for key in keys:
        assert await store.claim(key, "b", lease=60) == "busy"
        assert await store.complete(key, "a", ttl=60) is True
        assert await store.claim(key, "b", lease=60) == "done"


# -- Redis specifics ----------------------------------------------------------------------


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    ensure(REDIS)
    import redis.asyncio as aioredis

    client: aioredis.Redis = aioredis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


async def test_redis_keys_live_under_the_prefix_with_ttls(
    prefix: str, redis_client: aioredis.Redis
) -> None:
    from aioworkers.idempotency.redis import RedisStore

    store = RedisStore(f"{REDIS_URL}?prefix={prefix}")
    try:
        assert await store.claim("send:k1", "a", lease=5) == "claimed"
        assert await store.claim("send:k2", "a", lease=5) == "claimed"
        assert await store.complete("send:k2", "a", ttl=50) is True
        keys = sorted([k async for k in redis_client.scan_iter(match=f"{prefix}:*")])
        assert keys == [f"{prefix}:send:k1".encode(), f"{prefix}:send:k2".encode()]
        assert 0 < await redis_client.pttl(f"{prefix}:send:k1") <= 5000
        assert 5000 < await redis_client.pttl(f"{prefix}:send:k2") <= 50_000
        # Nothing outside the prefix: another store with another prefix sees its own keys.
        other = RedisStore(f"{REDIS_URL}?prefix={prefix}-other")
        try:
            assert await other.claim("send:k1", "b", lease=5) == "claimed"
        finally:
            await other.aclose()
    finally:
        await store.aclose()
        await delete_prefix(prefix)
        await delete_prefix(f"{prefix}-other")


async def test_redis_prefix_argument_wins_and_has_a_default() -> None:
    from aioworkers.idempotency.redis import DEFAULT_PREFIX, RedisStore

    stores = [
        RedisStore(REDIS_URL),
        RedisStore(f"{REDIS_URL}?prefix=p1"),
        RedisStore(f"{REDIS_URL}?prefix=p1", prefix="p2"),
    ]
    try:
        assert [s.prefix for s in stores] == [DEFAULT_PREFIX, "p1", "p2"]
        assert "secret" not in repr(RedisStore("redis://:secret@127.0.0.1:6379/0"))
    finally:
        for s in stores:
            await s.aclose()


async def test_unreachable_redis_raises_store_unavailable_quickly() -> None:
    from aioworkers.idempotency.redis import RedisStore

    # Port 1 refuses connections: every call fails fast with the transient error.
    store = RedisStore("redis://:secret@127.0.0.1:1/0")
    try:
        async with asyncio.timeout(3):
            for call in (
                store.claim("k", "a", lease=1),
                store.extend([("k", "a")], lease=1),
                store.complete("k", "a", ttl=1),
                store.release("k", "a"),
            ):
                with pytest.raises(StoreUnavailable) as info:
                    await call
                assert "secret" not in str(info.value)
    finally:
        await store.aclose()


def test_open_store_by_url() -> None:
    from aioworkers.idempotency.sqlite import SqliteStore

    assert isinstance(open_store("memory://"), MemoryStore)
    assert isinstance(open_store("sqlite:///jobs.db"), SqliteStore)
    with pytest.raises(ConfigError, match="not a sqlite:/// file URL"):
        open_store("sqlite://")
    with pytest.raises(ConfigError, match="no option 'prefix'"):
        open_store("sqlite:///jobs.db?prefix=x")
    with pytest.raises(ConfigError, match="scheme must be one of") as info:
        open_store("mongodb://u:secret@h/db")
    assert "secret" not in str(info.value)


async def test_an_app_with_a_redis_store_runs_a_key_once(prefix: str) -> None:
    ensure(REDIS)
    app = App("memory://", visibility_timeout=1.0, idempotency=f"{REDIS_URL}?prefix={prefix}")
    runs: list[str] = []

    @app.task(idempotent=True)
    async def charge(order: str) -> None:
        runs.append(order)

    try:
        await charge.options(key="order-1").enqueue("first")
        await charge.options(key="order-1").enqueue("second")
        worker = app.worker(concurrency=1, poll=0.05)
        async with asyncio.timeout(5):
            await worker.run(burst=True)
        assert runs == ["first"]
        assert worker.counts == {"ok": 1, "duplicate": 1}
        assert await app.stats() == QueueDepth()
    finally:
        await app.aclose()
        await delete_prefix(prefix)


async def test_a_sqlite_broker_keeps_its_keys_in_its_own_file_for_every_process(
    tmp_path: Path,
) -> None:
    from aioworkers.idempotency.sqlite import SqliteStore

    url = f"sqlite:///{tmp_path}/jobs.db?poll=0.02"
    runs: list[str] = []
    # Two apps on one file, as two worker processes would be: one set of keys.
    first, second = App(url, visibility_timeout=1.0), App(url, visibility_timeout=1.0)
    try:
        for app in (first, second):
            assert isinstance(app.idempotency, SqliteStore)
            assert app.idempotency.path == f"{tmp_path}/jobs.db"

            @app.task(idempotent=True, name="charge")
            async def charge(order: str) -> None:
                runs.append(order)

        await first.enqueue("charge", ["first"], key="order-1")
        async with asyncio.timeout(5):
            await first.worker(concurrency=1, poll=0.05).run(burst=True)
        await second.enqueue("charge", ["second"], key="order-1")
        worker = second.worker(concurrency=1, poll=0.05)
        async with asyncio.timeout(5):
            await worker.run(burst=True)
        assert runs == ["first"]
        assert worker.counts == {"duplicate": 1}
    finally:
        await first.aclose()
        await second.aclose()
