"""The end-to-end harness (`tests.e2e.harness`) on ``sqlite://``: worker subprocesses share
one database file in the test's own directory; the ledger stays in the local Redis."""

from __future__ import annotations

from pathlib import Path

import aioworkers

from ..e2e.harness import E2E
from ..services import REDIS

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
