"""``aioworkers run --processes N``: real supervisor and worker processes, real signals.

The Redis tests keep a ledger in Redis (job ids done, runs per job, pids that ran jobs)
under the test's own prefix, and delete it after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

import aioworkers
from aioworkers import Call, supervisor
from tests.services import REDIS, REDIS_URL, delete_prefix, ensure

HERE = Path(__file__).parent
APPS = HERE / "apps"
CLI_APPS = HERE.parent / "cli" / "apps"


def wait_until(check: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.05)


def children_of(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (read from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


class Supervised:
    """``python -m aioworkers run *args`` with its output in a log file."""

    def __init__(self, tmp: Path, *args: str, cwd: Path, env: dict[str, str]) -> None:
        self.log_path = tmp / f"supervisor-{uuid.uuid4().hex[:6]}.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aioworkers", "run", *args],
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> set[int]:
        return children_of(self.proc.pid)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"supervisor still running after {timeout}s:\n{self.log()}"
            ) from None

    def kill(self) -> None:
        """Kill the supervisor and its children (each in a process group of its own)."""
        for pid in self.children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AIOWORKERS_BROKER_URL"}
    env.update(extra)
    return env


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    started: list[Supervised] = []

    def start(*args: str, cwd: Path = APPS, **env: str) -> Supervised:
        sup = Supervised(tmp_path, *args, cwd=cwd, env=_env(**env))
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.kill()


@pytest.fixture
def prefix() -> Iterator[str]:
    ensure(REDIS)
    name = f"test-deploy-{uuid.uuid4().hex[:8]}"
    yield name
    asyncio.run(delete_prefix(name))


class Ledger:
    def __init__(self, prefix: str) -> None:
        self.client = redis.Redis.from_url(REDIS_URL)
        self.prefix = prefix

    def done(self) -> set[str]:
        return {m.decode() for m in self.client.smembers(f"{self.prefix}:ledger:done")}

    def runs(self) -> dict[str, int]:
        runs = self.client.hgetall(f"{self.prefix}:ledger:runs")
        return {k.decode(): int(v) for k, v in runs.items()}

    def pids(self) -> set[int]:
        return {int(m) for m in self.client.smembers(f"{self.prefix}:ledger:pids")}


def enqueue(
    prefix: str, count: int, seconds: float, leak_mb: int = 0, url: str | None = None
) -> list[str]:
    async def go() -> list[str]:
        async with aioworkers.App(url or f"{REDIS_URL}?prefix={prefix}") as app:
            calls = [Call("work", (seconds, leak_mb)) for _ in range(count)]
            return await app.enqueue_many(calls)

    return asyncio.run(go())


# -- supervision, on the memory broker (each child seeds its own) ----------------------------


def test_sigterm_drains_every_child_and_exits_0(start: Callable[..., Supervised]) -> None:
    sup = start(
        "cliapp:app", "--processes", "2", "--grace", "10", cwd=CLI_APPS, CLIAPP_SEED="nap=1"
    )
    wait_until(lambda: sup.log().count("nap start") == 2, within=15, what="both children busy")
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.wait(15) == 0, sup.log()
    out = sup.log()
    assert out.count("nap done 1.0") == 2, out
    assert "SIGTERM: stopping 2 worker processes" in out
    assert out.count("ok=1 retried=0 dead=0 released=0") == 2, out


def test_second_signal_stops_every_child_now(start: Callable[..., Supervised]) -> None:
    sup = start(
        "cliapp:app", "--processes", "2", "--grace", "30", cwd=CLI_APPS, CLIAPP_SEED="nap=30"
    )
    wait_until(lambda: sup.log().count("nap start") == 2, within=15, what="both children busy")
    began = time.monotonic()
    sup.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.wait(15) == 0, sup.log()
    assert time.monotonic() - began < 10
    assert sup.log().count("ok=0 retried=0 dead=0 released=1") == 2, sup.log()


def test_children_stop_when_the_supervisor_is_killed(start: Callable[..., Supervised]) -> None:
    sup = start("cliapp:app", "--processes", "2", cwd=CLI_APPS, CLIAPP_SEED="nap=0.2")
    wait_until(lambda: sup.log().count("nap done") == 2, within=15, what="both children busy")
    children = sup.children()
    assert len(children) == 2
    sup.proc.kill()
    sup.proc.wait()
    wait_until(
        lambda: not any(Path(f"/proc/{pid}/stat").exists() for pid in children),
        within=10,
        what="orphaned children to stop",
    )
    assert sup.log().count("is gone: stopping") == 2, sup.log()


def test_an_import_error_is_reported_once_and_not_respawned(
    start: Callable[..., Supervised],
) -> None:
    sup = start("nosuchmodule:app", "--processes", "3")
    assert sup.wait(10) == 2, sup.log()
    out = sup.log()
    assert out.count("cannot import module 'nosuchmodule'") == 1, out
    assert "not restarting" in out


def test_children_crashing_at_start_are_tried_a_few_times_then_given_up(
    start: Callable[..., Supervised],
) -> None:
    sup = start("boomapp:app", "--processes", "3")
    assert sup.wait(20) == 1, sup.log()
    out = sup.log()
    assert out.count("RuntimeError: cannot start") == supervisor.MAX_START_FAILURES, out
    assert f"({supervisor.MAX_START_FAILURES} in a row): not restarting" in out


@pytest.mark.parametrize(("processes", "expected"), [(3, 3), (0, len(os.sched_getaffinity(0)))])
def test_processes_0_means_one_per_cpu(processes: int, expected: int) -> None:
    assert supervisor.child_count(processes) == expected


@pytest.mark.parametrize(
    ("rc", "text"),
    [(-9, "killed by SIGKILL"), (1, "exited with code 1"), (supervisor.RECYCLE_EXIT, "recycled")],
)
def test_exit_descriptions(rc: int, text: str) -> None:
    assert supervisor.describe_exit(rc) == text


# -- horizontal scaling and recycling, on real Redis ------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "sqlite"])
def test_three_processes_share_a_queue_and_a_killed_child_is_replaced(
    start: Callable[..., Supervised], prefix: str, broker: str, tmp_path: Path
) -> None:
    # On sqlite:// the three children share one file: the embedded default, scaled out on
    # one machine. The ledger stays in Redis either way.
    url = f"{REDIS_URL}?prefix={prefix}"
    env = {"DEPLOY_BROKER_URL": url}
    if broker == "sqlite":
        url = f"sqlite:///{tmp_path}/jobs.db"
        env = {"DEPLOY_BROKER_URL": url, "DEPLOY_LEDGER_URL": REDIS_URL, "DEPLOY_PREFIX": prefix}
    sup = start(
        "scaleapp:app",
        "--processes",
        "3",
        "--concurrency",
        "5",
        "--grace",
        "10",
        DEPLOY_VISIBILITY="2",
        **env,
    )
    wait_until(lambda: sup.log().count("worker started") == 3, within=20, what="3 children up")
    ledger = Ledger(prefix)
    ids = enqueue(prefix, 1500, 0.05, url=url)
    wait_until(lambda: len(ledger.done()) >= 200, within=20, what="200 jobs done")
    before = sup.children()
    assert len(before) == 3
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    new: set[int] = set()

    def replaced() -> bool:
        # One snapshot per check: the victim may be listed in one read and gone in the next.
        now = sup.children()
        new.update(now - before)
        return len(now) == 3 and bool(new)

    wait_until(replaced, within=10, what="a replacement child")
    (replacement,) = new
    # Work that arrives once the replacement is up, so it takes its share however much of
    # the first batch the other children finished while it was starting.
    wait_until(lambda: sup.log().count("worker started") == 4, within=20, what="it is up")
    ids += enqueue(prefix, 300, 0.05, url=url)
    wait_until(lambda: len(ledger.done()) == len(ids), within=40, what="every job done")

    assert ledger.done() == set(ids)
    runs = ledger.runs()
    # At-least-once: only jobs the killed child had finished but not yet acked run twice.
    duplicates = sum(runs.values()) - len(ids)
    assert 0 <= duplicates <= 5, duplicates
    assert {victim, replacement} <= ledger.pids(), "the killed child and its replacement ran jobs"
    out = sup.log()
    assert f"worker process {victim} killed by SIGKILL while running; restarting in 0.5s" in out

    sup.proc.send_signal(signal.SIGTERM)
    assert sup.wait(20) == 0, out
    assert not sup.children()


def test_max_jobs_per_child_recycles_without_losing_a_job(
    start: Callable[..., Supervised], prefix: str
) -> None:
    url = f"{REDIS_URL}?prefix={prefix}"
    ids = enqueue(prefix, 200, 0.01)
    sup = start(
        "scaleapp:app",
        "--processes",
        "2",
        "--concurrency",
        "5",
        "--burst",
        "--max-jobs-per-child",
        "40",
        DEPLOY_BROKER_URL=url,
    )
    assert sup.wait(40) == 0, sup.log()
    ledger = Ledger(prefix)
    assert ledger.done() == set(ids)
    # A recycled child drains what it started and hands back what it had not: no job
    # runs twice.
    assert sum(ledger.runs().values()) == len(ids)
    out = sup.log()
    assert out.count("recycled: starting a fresh one") >= 3, out
    assert len(ledger.pids()) >= 5


def test_max_memory_per_child_recycles_a_leaking_task(
    start: Callable[..., Supervised], prefix: str
) -> None:
    url = f"{REDIS_URL}?prefix={prefix}"
    ids = enqueue(prefix, 40, 0.2, leak_mb=4)
    sup = start(
        "scaleapp:app",
        "--concurrency",
        "2",
        "--burst",
        "--max-memory-per-child",
        "90",
        DEPLOY_BROKER_URL=url,
    )  # a per-child limit without --processes runs one child
    assert sup.wait(40) == 0, sup.log()
    ledger = Ledger(prefix)
    assert ledger.done() == set(ids)
    assert sum(ledger.runs().values()) == len(ids)
    out = sup.log()
    assert "over --max-memory-per-child" in out
    assert out.count("recycled: starting a fresh one") >= 2, out


@pytest.mark.slow
def test_chaos_random_kills_while_10k_jobs_flow(
    start: Callable[..., Supervised], prefix: str
) -> None:
    url = f"{REDIS_URL}?prefix={prefix}"
    sup = start(
        "scaleapp:app", "--processes", "3", "--concurrency", "50", "--grace", "10",
        DEPLOY_BROKER_URL=url, DEPLOY_VISIBILITY="3",
    )  # fmt: skip
    wait_until(lambda: sup.log().count("worker started") == 3, within=20, what="3 children up")
    ledger = Ledger(prefix)
    ids = enqueue(prefix, 10_000, 0.05)
    rng = random.Random(7)
    kills = 0
    while len(ledger.done()) < len(ids) * 0.8 and kills < 20:
        time.sleep(rng.uniform(0.3, 1.5))
        children = sorted(sup.children())
        if children:
            os.kill(rng.choice(children), signal.SIGKILL)
            kills += 1
    wait_until(lambda: len(ledger.done()) == len(ids), within=120, what="every job done")
    wait_until(lambda: len(sup.children()) == 3, within=40, what="3 children again")
    assert kills >= 3
    assert sup.proc.poll() is None, sup.log()
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.wait(30) == 0, sup.log()
    duplicates = sum(ledger.runs().values()) - len(ids)
    assert duplicates <= kills * 50, duplicates  # each kill: at most its jobs in flight
