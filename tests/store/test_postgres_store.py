"""The PostgreSQL state store: the conformance suite (each test in a database of its own,
migrated), its schema check, and ``current_job().complete_in(conn)``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import asyncpg
import pytest

from aioworkers.testing.store_conformance import StoreCase, StoreConformance

from ..services import postgres_database

pytest.importorskip("asyncpg")


@asynccontextmanager
async def postgres_case() -> AsyncIterator[StoreCase]:
    from aioworkers.store.postgres import PostgresStore

    async with postgres_database("aw_store") as url:
        store = PostgresStore(url)
        await store.migrate()
        try:
            yield StoreCase(store, ttl=0.3, slack=0.2, url=url, name="postgresql")
        finally:
            await store.aclose()


class TestPostgres(StoreConformance):
    def store_case(self) -> AbstractAsyncContextManager[StoreCase]:
        return postgres_case()


@pytest.fixture
async def url() -> AsyncIterator[str]:
    from aioworkers.store.postgres import PostgresStore

    async with postgres_database("aw_store") as url:
        store = PostgresStore(url)
        try:
            assert await store.migrate() == [1, 2]
        finally:
            await store.aclose()
        yield url


async def test_a_waiter_in_another_client_wakes_on_the_notify(url: str) -> None:
    from aioworkers.store import JobFinish, JobRecord
    from aioworkers.store.postgres import POLL_LISTENING, PostgresStore

    a, b = PostgresStore(url), PostgresStore(url)
    try:
        await a.put_job(JobRecord("j1", "t", "q", "running"), ttl=60)
        waiter = asyncio.create_task(b.wait_job("j1", timeout=30))
        await asyncio.sleep(0)  # the waiter starts, and with it the LISTEN connection
        assert b._listening is not None
        await b._listening
        assert b._listening_up()
        await asyncio.sleep(POLL_LISTENING / 2)  # the waiter is in its (1 s) poll pause
        started = time.monotonic()
        await a.finish_jobs([JobFinish("j1", "succeeded", ttl=60, finished_at=1.0)])
        record = await waiter
        # Woken by the NOTIFY, not by the next read (a real timer: the poll's 1 s).
        assert time.monotonic() - started < POLL_LISTENING / 4
        assert record is not None
        assert record.status == "succeeded"
    finally:
        await a.aclose()
        await b.aclose()


async def test_lapsed_rows_are_swept_in_batches(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from aioworkers.store import postgres
    from aioworkers.store.postgres import PostgresStore

    monkeypatch.setattr(postgres, "SWEEP_BATCH", 7)
    store = PostgresStore(url)
    conn = await asyncpg.connect(url)
    try:
        for i in range(20):
            await store.claim(f"k{i}", "o", lease=0.05)
            await store.claim_slot("s", str(i), ttl=0.05)
        await store.claim("kept", "o", lease=60)
        await asyncio.sleep(0.1)  # the rows' TTLs are the server's clock
        store._sweep_at = 0.0
        await store.cancelled(["x"])  # any call starts a sweep that is due
        assert store._sweeping is not None
        await store._sweeping
        assert await conn.fetchval("SELECT count(*) FROM aioworkers_keys") == 1
        assert await conn.fetchval("SELECT count(*) FROM aioworkers_state") == 0
    finally:
        await conn.close()
        await store.aclose()


async def test_a_store_of_its_own_schema_is_migrated_there(url: str) -> None:
    from aioworkers.store.postgres import PostgresStore

    store = PostgresStore(f"{url}?schema=state_here&pool_size=2")
    try:
        assert await store.migrate() == [1, 2]
        assert await store.claim("k", "o", lease=5) == "claimed"
    finally:
        await store.aclose()
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM state_here.aioworkers_keys") == 1
    finally:
        await conn.close()
