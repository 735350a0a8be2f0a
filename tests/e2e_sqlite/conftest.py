"""Fixtures for the end-to-end tests on SQLite: real worker subprocesses sharing one
database file with the test, the ledger in the local Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ..services import REDIS, ensure
from .harness import SqliteE2E

__all__ = ["SqliteE2E", "e2e"]


@pytest.fixture
async def e2e(tmp_path: Path) -> AsyncIterator[SqliteE2E]:
    ensure(REDIS)
    world = SqliteE2E(tmp_path)
    try:
        yield world
    finally:
        await world.aclose()
