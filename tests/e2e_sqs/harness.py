"""The end-to-end harness (`tests.e2e.harness`) on ``sqs://``: worker subprocesses on a
moto server, queues under the test's own prefix; the ledger stays in the local Redis."""

from __future__ import annotations

from pathlib import Path

from ..e2e.harness import E2E
from ..services import REDIS_URL, sqs_url


class SqsE2E(E2E):
    """`E2E` with an ``sqs://`` broker: queue ``q`` is the SQS queue ``<prefix>-q``."""

    def __init__(self, workdir: Path, endpoint: str) -> None:
        super().__init__(REDIS_URL, workdir)
        self.broker_url = sqs_url(endpoint, prefix=f"{self.prefix}-")
        self.extra_env = {"E2E_LEDGER_URL": REDIS_URL, "E2E_PREFIX": self.prefix}
        self.app = self.client()
