"""Fixtures for the end-to-end tests on SQLite: real worker subprocesses sharing one
database file with the test, the ledger in the local Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import aioworkers

from ..e2e.harness import E2E
from ..services import REDIS, ensure

REDIS_URL = f"redis://{REDIS.host}:{REDIS.port}/0"


class SqliteE2E(E2E):
    """`E2E` with ``sqlite://`` on a file in the test's own directory."""

    def __init__(self, workdir: Path) -> None:
        self.db = workdir / "jobs.db"
        super().__init__(REDIS_URL, workdir)
        self.broker_url = self.url
        self.extra_env = {"E2E_LEDGER_URL": REDIS_URL, "E2E_PREFIX": self.prefix}

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db}"  # an absolute path: four slashes in all

    def client(self, *, visibility: float = 30.0) -> aioworkers.App:
        app = aioworkers.App(self.url, visibility_timeout=visibility)
        self._apps.append(app)
        return app


@pytest.fixture
async def e2e(tmp_path: Path) -> AsyncIterator[SqliteE2E]:
    ensure(REDIS)
    world = SqliteE2E(tmp_path)
    try:
        yield world
    finally:
        await world.aclose()
