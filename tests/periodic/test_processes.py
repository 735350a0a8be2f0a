"""Real worker processes (``aioworkers run``) on Redis, a SQLite file and RabbitMQ (with a
Redis store) share one ``every=1`` schedule: every slot fires exactly once, also while one
worker is SIGKILLed and another SIGSTOPped, and a restart after all were down catches up
within ``catchup``.

Real time, on purpose: what is under test is separate processes racing on a real store,
so the schedule is short (1 s) and each test lasts a few seconds."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..services import (
    AMQP_URL,
    RABBITMQ,
    REDIS,
    REDIS_URL,
    delete_amqp_queues,
    delete_prefix,
    ensure,
)

ROOT = Path(__file__).parents[2]
SLOT = 1000  # ms


@pytest.fixture(params=["redis", "sqlite", "amqp"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of the workers: a broker (and a store, for RabbitMQ)."""
    prefix = f"periodic-{uuid.uuid4().hex[:8]}"
    if request.param == "sqlite":
        yield {"PERIODIC_BROKER": f"sqlite:///{tmp_path / 'queue.db'}"}
        return
    ensure(REDIS)
    if request.param == "redis":
        yield {"PERIODIC_BROKER": f"{REDIS_URL}?prefix={prefix}"}
    else:
        ensure(RABBITMQ)
        store = f"{REDIS_URL}?prefix={prefix}"
        yield {"PERIODIC_BROKER": AMQP_URL, "PERIODIC_STORE": store, "PERIODIC_QUEUE": prefix}
        asyncio.run(delete_amqp_queues({prefix, f"{prefix}.dead"}))
    asyncio.run(delete_prefix(prefix))


class Workers:
    def __init__(self, broker: dict[str, str], ledger: Path, **env: str) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AIOWORKERS_")}
        self.env |= {**broker, "PERIODIC_LEDGER": str(ledger), **env}
        self.ledger = ledger
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_path = ledger.with_suffix(".log")
        self.log = self.log_path.open("ab")

    def close(self) -> None:
        self.stop()
        self.log.close()

    def start(self, n: int) -> None:
        for _ in range(n):
            argv = [sys.executable, "-m", "aioworkers", "run", "tests.periodic.apps.ledger:app"]
            self.procs.append(
                subprocess.Popen(
                    [*argv, "--log-level", "WARNING"],
                    cwd=ROOT,
                    env=self.env,
                    stdout=subprocess.DEVNULL,
                    stderr=self.log,
                )
            )

    def lines(self) -> list[tuple[str, int]]:
        if not self.ledger.exists():
            return []
        rows = [line.split() for line in self.ledger.read_text().splitlines()]
        return [(job, int(slot)) for job, slot, _ in rows]

    def wait_for(self, count: int, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while len(self.lines()) < count:
            assert time.monotonic() < deadline, f"only {len(self.lines())} fires"
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []

    def jobs_per_slot(self) -> dict[int, set[str]]:
        slots: dict[int, set[str]] = defaultdict(set)
        for job, slot in self.lines():
            slots[slot].add(job)  # a job run twice (redelivered) is still one fire
        return slots


def assert_each_slot_once(slots: dict[int, set[str]], first: int, last: int) -> None:
    doubles = {s: jobs for s, jobs in slots.items() if len(jobs) > 1}
    assert not doubles
    missing = [s for s in range(first, last + 1, SLOT) if s not in slots]
    assert not missing, f"slots not fired: {missing}"


def test_three_workers_fire_every_slot_once_through_kill_and_stop(
    broker: dict[str, str], tmp_path: Path
) -> None:
    workers = Workers(broker, tmp_path / "ledger")
    try:
        workers.start(3)
        workers.wait_for(2)
        workers.procs[0].kill()  # SIGKILL: its claims and jobs are left behind
        workers.procs[1].send_signal(signal.SIGSTOP)
        start = len(workers.lines())
        workers.wait_for(start + 3)
        workers.procs[1].send_signal(signal.SIGCONT)
        workers.wait_for(start + 5)
        # Room for a job the killed worker held to come back (visibility_timeout=3).
        end = max(slot for _, slot in workers.lines())
        time.sleep(4)
    finally:
        workers.close()
    slots = workers.jobs_per_slot()
    assert_each_slot_once(slots, min(slots), end)


def test_down_and_back_catches_up_within_catchup(broker: dict[str, str], tmp_path: Path) -> None:
    workers = Workers(broker, tmp_path / "ledger", PERIODIC_CATCHUP="60")
    try:
        workers.start(1)
        workers.wait_for(1)
        workers.stop()
        down_at = max(slot for _, slot in workers.lines())
        time.sleep(3)  # every worker down: slots pass unfired
        workers.start(2)
        workers.wait_for(len(workers.lines()) + 5)
        end = max(slot for _, slot in workers.lines())
    finally:
        workers.close()
    slots = workers.jobs_per_slot()
    assert max(slots) - down_at >= 3 * SLOT
    assert_each_slot_once(slots, min(slots), end)  # the missed ones were caught up
