"""Fixtures for the end-to-end tests: real Redis, real worker subprocesses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ..services import REDIS, ensure
from .harness import E2E

REDIS_URL = f"redis://{REDIS.host}:{REDIS.port}/0"


@pytest.fixture
async def e2e(tmp_path: Path) -> AsyncIterator[E2E]:
    """The test's own key prefix on the shared Redis; its workers are killed and its keys
    deleted afterwards, whatever happened."""
    ensure(REDIS)
    world = E2E(REDIS_URL, tmp_path)
    try:
        yield world
    finally:
        await world.aclose()
