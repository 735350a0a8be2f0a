"""Worker processes sharing one SQLite file with the CLI run from another process. (Kills,
shutdown, poison, garbage and delays on every broker: ``tests/e2e_matrix``.)"""

from __future__ import annotations

import subprocess
import sys

import orjson

from aioworkers import QueueDepth

from ..e2e.harness import ROOT
from .conftest import SqliteE2E

EMPTY = QueueDepth()


async def test_garbage_is_dead_lettered_and_the_cli_sees_it_from_another_process(
    e2e: SqliteE2E,
) -> None:
    await e2e.app.broker.publish("default", [b"\xff\x00 not an envelope"])
    ids = await e2e.enqueue(3)
    await e2e.start_worker(concurrency=5)
    await e2e.wait_done(3, within=20)
    await e2e.wait_depth(QueueDepth(dead=1))
    assert (await e2e.ledger()).done == set(ids)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {"E2E_BROKER_URL": e2e.url, "E2E_LEDGER_URL": e2e.redis_url, "PATH": ""}
        return subprocess.run(
            [sys.executable, "-m", "aioworkers", *args, "tests.e2e.ledger_app:app"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    stats = cli("stats", "--json")
    assert stats.returncode == 0, stats.stderr
    depth = orjson.loads(stats.stdout)["queues"]["default"]
    assert depth | {"rates": None} == {
        "ready": 0,
        "in_flight": 0,
        "delayed": 0,
        "dead": 1,
        "rates": None,
    }
    listed = cli("dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = orjson.loads(listed.stdout)["default"]
    assert (entry["reason"], entry["task"]) == ("decode_error", None)
    purged = cli("dlq", "purge")
    assert purged.returncode == 0, purged.stderr
    await e2e.wait_depth(EMPTY)
