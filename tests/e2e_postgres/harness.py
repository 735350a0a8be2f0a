"""The end-to-end harness (`tests.e2e.harness`) on ``postgresql://``: worker subprocesses
share a database of the test's own (created and migrated here, dropped by `aclose`); the
ledger stays in the local Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import orjson

import aioworkers
from aioworkers.brokers.postgres import PostgresBroker

from ..e2e.harness import E2E, WorkerProcess
from ..services import POSTGRES, POSTGRES_ADMIN_URL, REDIS, ensure

REDIS_URL = f"redis://{REDIS.host}:{REDIS.port}/0"
T = TypeVar("T")


def _in_a_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on a loop of its own (callable from sync code and from a
    running loop alike)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _migrate(url: str) -> None:
    broker = PostgresBroker(url)
    try:
        await broker.migrate()
    finally:
        await broker.aclose()


class PostgresE2E(E2E):
    """`E2E` on ``postgresql://``, a migrated database of the test's own."""

    def __init__(self, workdir: Path, *, host_port: str = "127.0.0.1:5432") -> None:
        ensure(POSTGRES)
        self.database = f"aw_e2e_{uuid.uuid4().hex[:12]}"
        _in_a_thread(_admin(f"CREATE DATABASE {self.database}"))
        self.direct_url = f"postgresql://postgres@127.0.0.1:5432/{self.database}"
        _in_a_thread(_migrate(self.direct_url))
        self.db_url = f"postgresql://postgres@{host_port}/{self.database}"
        super().__init__(REDIS_URL, workdir)
        self.broker_url = self.db_url
        self.extra_env = {"E2E_LEDGER_URL": REDIS_URL, "E2E_PREFIX": self.prefix}
        self.app = self.client()

    @property
    def url(self) -> str:
        return self.broker_url

    def client(self, *, visibility: float = 30.0) -> aioworkers.App:
        app = aioworkers.App(self.broker_url, visibility_timeout=visibility)
        self._apps.append(app)
        return app

    async def connect(self) -> asyncpg.Connection:
        """A connection of the application's own, straight to the database."""
        return await asyncpg.connect(self.direct_url)

    async def held(self, worker: WorkerProcess, queue: str = "default") -> set[str]:
        """The job ids leased right now (the worker is alone on the queue)."""
        conn = await self.connect()
        try:
            rows = await conn.fetch(
                "SELECT body FROM aioworkers_jobs WHERE queue = $1 AND lease IS NOT NULL "
                "AND visible_at > now()",
                queue,
            )
        finally:
            await conn.close()
        return {orjson.loads(row[0])["id"] for row in rows}

    async def aclose(self, *, delete_keys: bool = True) -> None:
        try:
            await super().aclose(delete_keys=delete_keys)
        finally:
            await _admin(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)")
