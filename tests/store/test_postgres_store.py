"""The PostgreSQL state store: the conformance suite (each test in a database of its own,
migrated), its schema check, and ``current_job().complete_in(conn)``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

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
