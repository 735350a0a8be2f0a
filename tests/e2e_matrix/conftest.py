"""The fault matrix's worlds: each test runs once per broker (redis, amqp, sqs, sqlite),
with real worker subprocesses and the ledger in the local Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .worlds import BROKERS, Matrix, world


@pytest.fixture(params=BROKERS)
async def e2e(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Matrix]:
    """The test's world on one broker; its workers are killed and its queues and keys
    deleted afterwards, whatever happened."""
    made = world(request.param, tmp_path)
    try:
        yield made
    finally:
        await made.aclose()
