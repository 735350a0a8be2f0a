"""Fixtures for the end-to-end tests on SQS: real worker subprocesses on the session's moto
server (queues under the test's own prefix), the ledger in the local Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ..services import REDIS, ensure, moto_endpoint
from .harness import SqsE2E

__all__ = ["SqsE2E", "e2e"]


@pytest.fixture
async def e2e(tmp_path: Path) -> AsyncIterator[SqsE2E]:
    ensure(REDIS)
    world = SqsE2E(tmp_path, moto_endpoint())
    try:
        yield world
    finally:
        await world.aclose()
