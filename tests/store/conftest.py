"""The stores under test for the store conformance suite (`aioworkers.testing.store_conformance`,
run on each of them by ``test_conformance.py``): memory (on a real and on a fake clock),
SQLite in a temporary file, Redis on the local server under a prefix of its own."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aioworkers.store.memory import MemoryStore
from aioworkers.testing import FakeClock
from aioworkers.testing.store_conformance import StoreCase

from ..services import REDIS, REDIS_URL, ensure


async def delete_keys(prefix: str) -> None:
    """Remove every key under ``prefix`` (claims ``prefix:...``, the rest ``prefix|...``)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@asynccontextmanager
async def memory_case() -> AsyncIterator[StoreCase]:
    yield StoreCase(MemoryStore(), ttl=0.3, slack=0.2, name="memory")


@asynccontextmanager
async def memory_fake_clock_case() -> AsyncIterator[StoreCase]:
    # Long TTLs cost no real time: the suite moves the clock.
    clock = FakeClock()
    yield StoreCase(MemoryStore(clock=clock), ttl=30.0, slack=0.0, clock=clock, name="memory")


@asynccontextmanager
async def sqlite_case() -> AsyncIterator[StoreCase]:
    from aioworkers.store.sqlite import SqliteStore

    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite:///{directory}/state.db"
        store = SqliteStore(url)
        try:
            yield StoreCase(store, ttl=0.3, slack=0.2, url=url, name="sqlite")
        finally:
            await store.aclose()


@asynccontextmanager
async def redis_case() -> AsyncIterator[StoreCase]:
    ensure(REDIS)
    from aioworkers.store.redis import RedisStore

    prefix = f"test-store-{uuid.uuid4().hex[:12]}"
    url = f"{REDIS_URL}?prefix={prefix}"
    store = RedisStore(url)
    try:
        yield StoreCase(store, ttl=0.3, slack=0.2, url=url, name="redis")
    finally:
        await store.aclose()
        await delete_keys(prefix)
