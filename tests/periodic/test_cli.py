"""``aioworkers schedules`` and ``run --no-scheduler``, as processes on a SQLite file."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import orjson

from .test_processes import ROOT, Workers

APP = "tests.periodic.apps.ledger:app"


def schedules(workers: Workers, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aioworkers", "schedules", APP, *args],
        cwd=ROOT,
        env=workers.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_schedules_shows_next_and_last_slot(tmp_path: Path) -> None:
    workers = Workers({"PERIODIC_BROKER": f"sqlite:///{tmp_path / 'q.db'}"}, tmp_path / "ledger")
    try:
        shown = orjson.loads(schedules(workers, "--json").stdout)
        assert [(s["name"], s["expression"], s["tz"], s["last"]) for s in shown] == [
            ("tick", "every 1s", "UTC", None)
        ]
        workers.start(1)
        workers.wait_for(2)
    finally:
        workers.close()
    last = max(slot for _, slot in workers.lines())
    done = schedules(workers, "--json")
    assert done.returncode == 0, done.stderr
    (row,) = orjson.loads(done.stdout)
    # The last slot decided may be one the worker fired just before it stopped.
    assert datetime.fromisoformat(row["last"]).timestamp() * 1000 >= last
    assert row["outcome"] == "fired"
    assert datetime.fromisoformat(row["next"]).timestamp() * 1000 > last
    table = schedules(workers)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == [
        "SCHEDULE",
        "TASK",
        "WHEN",
        "TZ",
        "NEXT",
        "LAST",
        "OUTCOME",
    ]
    assert "tick" in table.stdout
    assert "fired" in table.stdout


def test_no_scheduler_fires_nothing(tmp_path: Path) -> None:
    workers = Workers({"PERIODIC_BROKER": f"sqlite:///{tmp_path / 'q.db'}"}, tmp_path / "ledger")
    try:
        argv = [sys.executable, "-m", "aioworkers", "run", APP, "--no-scheduler"]
        workers.procs.append(subprocess.Popen(argv, cwd=ROOT, env=workers.env, stderr=workers.log))
        # Real time: slots must pass with the worker up for "nothing fired" to mean anything.
        time.sleep(3)
    finally:
        workers.close()
    assert workers.lines() == []
