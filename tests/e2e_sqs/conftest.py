"""Fixtures for the end-to-end tests on SQS: real worker subprocesses on the session's moto
server (queues under the test's own prefix), the ledger in the local Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ..e2e.harness import E2E
from ..services import REDIS, REDIS_URL, ensure, moto_endpoint, sqs_url


class SqsE2E(E2E):
    """`E2E` with an ``sqs://`` broker: queue ``q`` is the SQS queue ``<prefix>-q``."""

    def __init__(self, workdir: Path, endpoint: str) -> None:
        super().__init__(REDIS_URL, workdir)
        self.broker_url = sqs_url(endpoint, prefix=f"{self.prefix}-")
        self.extra_env = {"E2E_LEDGER_URL": REDIS_URL, "E2E_PREFIX": self.prefix}
        self.app = self.client()


@pytest.fixture
async def e2e(tmp_path: Path) -> AsyncIterator[SqsE2E]:
    ensure(REDIS)
    world = SqsE2E(tmp_path, moto_endpoint())
    try:
        yield world
    finally:
        await world.aclose()
