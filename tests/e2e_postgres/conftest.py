"""Fixtures for the end-to-end tests on PostgreSQL: real worker subprocesses sharing a
database of the test's own, the ledger in the local Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ..services import REDIS, ensure
from .harness import PostgresE2E

__all__ = ["PostgresE2E", "e2e"]


@pytest.fixture
async def e2e(tmp_path: Path) -> AsyncIterator[PostgresE2E]:
    ensure(REDIS)
    world = PostgresE2E(tmp_path)
    try:
        yield world
    finally:
        await world.aclose()
