"""Fixtures for the end-to-end tests on RabbitMQ: real worker subprocesses, a queue of
the test's own on the local RabbitMQ, the ledger in the local Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ..services import RABBITMQ, REDIS, ensure
from .harness import AmqpE2E


@pytest.fixture
async def e2e(tmp_path: Path) -> AsyncIterator[AmqpE2E]:
    ensure(REDIS)
    ensure(RABBITMQ)
    world = AmqpE2E(tmp_path)
    try:
        yield world
    finally:
        await world.aclose()
