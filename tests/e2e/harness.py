"""Real worker subprocesses, a Redis server of the test's own, and bounded waits.

Every helper here waits with a deadline and says what it waited for when it gives up;
`E2E.aclose` kills whatever the test started, even stopped (SIGSTOP) processes, and
deletes the test's keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis import exceptions as rexc

import aioworkers
from aioworkers import Call

from .ledger import LedgerKeys, Snapshot, count_done, read

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.e2e.ledger_app:app"
POLL = 0.05


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, within: float, what: str, every: float = POLL
) -> float:
    """Poll ``check`` until it is true; returns the seconds it took, fails after ``within``."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(every)
    return time.monotonic() - start


def consumer_pid(consumer: bytes) -> int:
    """The pid in a Redis broker consumer name (``host:pid:random``)."""
    return int(consumer.decode().rsplit(":", 2)[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class WorkerProcess:
    """``python -m aioworkers run tests.e2e.ledger_app:app ...`` from the repo root."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, name: str) -> None:
        self.proc = proc
        self.log_path = log
        self.name = name
        self.signalled = False  # whether the test sent it a signal (else exiting is a crash)

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.name} pid={self.pid} rc={self.proc.returncode}>"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.signalled = True
        if self.alive:
            self.proc.send_signal(sig)

    async def wait(self, within: float) -> int:
        """The exit code; fails (with the log's tail) if it has not exited ``within`` s."""
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            raise AssertionError(
                f"{self!r} still running after {within}s:\n{self.log()[-3000:]}"
            ) from None

    async def kill(self) -> None:
        if self.alive:
            self.proc.kill()  # SIGKILL also ends a stopped process
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 10)


class E2E:
    """One test's world: a key prefix of its own on one Redis, its workers, its ledger."""

    def __init__(self, redis_url: str, workdir: Path) -> None:
        self.redis_url = redis_url
        self.prefix = f"e2e-{uuid.uuid4().hex[:12]}"
        self.broker_url = f"{redis_url}?prefix={self.prefix}"
        self.keys = LedgerKeys(self.prefix)
        self.workdir = workdir
        self.redis: Any = aioredis.from_url(redis_url)
        self.workers: list[WorkerProcess] = []
        self.extra_env: dict[str, str] = {}  # more environment for the workers
        self._apps: list[aioworkers.App] = []
        self.app = self.client()

    def client(self, *, visibility: float = 30.0) -> aioworkers.App:
        """A producer / inspector on the test's broker (it runs no worker)."""
        app = aioworkers.App(self.broker_url, visibility_timeout=visibility)
        self._apps.append(app)
        return app

    def stream(self, queue: str = "default") -> str:
        return f"{self.prefix}:{{{queue}}}:stream"

    async def start_worker(
        self,
        *,
        concurrency: int,
        visibility: float = 30.0,
        max_deliveries: int = 5,
        job_seconds: float = 0.0,
        queues: Sequence[str] = (),
        grace: float | None = None,
    ) -> WorkerProcess:
        name = f"w{len(self.workers) + 1}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIOWORKERS_", "E2E_"))}
        env |= {
            "E2E_BROKER_URL": self.broker_url,
            "E2E_VISIBILITY": str(visibility),
            "E2E_MAX_DELIVERIES": str(max_deliveries),
            "E2E_JOB_SECONDS": str(job_seconds),
            "PYTHONUNBUFFERED": "1",
        }
        env |= self.extra_env
        argv = [sys.executable, "-m", "aioworkers", "run", APP, "--concurrency", str(concurrency)]
        if queues:
            argv += ["--queues", ",".join(queues)]
        if grace is not None:
            argv += ["--grace", str(grace)]
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
            )
        worker = WorkerProcess(proc, log, name)
        self.workers.append(worker)
        return worker

    async def started(self, worker: WorkerProcess, within: float = 20.0) -> None:
        """Wait until ``worker`` logs that it runs (its consumer group exists from then on)."""

        async def up() -> bool:
            if not worker.alive:
                raise AssertionError(f"{worker!r} exited at start-up:\n{worker.log()[-3000:]}")
            return "worker started" in worker.log()

        await wait_until(up, within=within, what=f"{worker.name} to start")

    async def enqueue(
        self,
        n: int,
        *,
        seconds: float | None = None,
        track: bool = False,
        redelivered: float | None = None,
        queue: str | None = None,
        task: str = "work",
        key: str | None = None,
    ) -> list[str]:
        """Enqueue ``n`` jobs of ``task`` (``work``, ``once`` or ``die``); returns their ids."""
        kwargs: dict[str, Any] = {}
        if task in ("work", "once"):
            kwargs["track"] = track
            if seconds is not None:
                kwargs["seconds"] = seconds
            if redelivered is not None:
                kwargs["redelivered"] = redelivered
        calls = [Call(task, (), kwargs, queue=queue, key=key) for _ in range(n)]
        ids: list[str] = []
        for start in range(0, n, 1000):
            ids += await self.app.enqueue_many(calls[start : start + 1000])
        return ids

    async def restart_until_dead_lettered(
        self, *, max_deliveries: int, visibility: float = 30.0, tries: int = 4
    ) -> WorkerProcess:
        """Start workers one after another, as a supervisor would, while a poison job keeps
        killing them, until the DLQ holds something; returns the worker alive then."""
        dlq = self.app.dlq()
        for _ in range(tries):
            worker = await self.start_worker(
                concurrency=5, visibility=visibility, max_deliveries=max_deliveries
            )
            worker.signalled = True  # it is expected to die

            async def settled(worker: WorkerProcess = worker) -> bool:
                return not worker.alive or bool(await dlq.list())

            await wait_until(settled, within=20, what="the worker to die or dead-letter")
            if await dlq.list():
                return worker
        raise AssertionError(f"nothing dead-lettered after {tries} workers")

    async def ledger(self) -> Snapshot:
        return await read(self.redis, self.keys)

    async def done(self) -> int:
        return await count_done(self.redis, self.keys)

    def check_workers(self) -> None:
        """Fail at once, with its log, if a worker exited that the test did not signal."""
        for worker in self.workers:
            if not worker.alive and not worker.signalled:
                raise AssertionError(f"{worker!r} exited on its own:\n{worker.log()[-3000:]}")

    async def wait_done(self, n: int, *, within: float) -> float:
        """Wait until the ledger holds ``n`` distinct ids; fails early if a worker crashed."""

        async def enough() -> bool:
            self.check_workers()
            return await self.done() >= n

        return await wait_until(enough, within=within, what=f"{n} jobs in the ledger")

    async def depth(self, queue: str = "default") -> aioworkers.QueueDepth:
        return await self.app.stats(queue)

    async def wait_depth(
        self, expected: aioworkers.QueueDepth, queue: str = "default", *, within: float = 10.0
    ) -> None:
        """Wait until the queue's depth is ``expected`` (the last ack trails the last effect
        by a round trip); fails with the depth last seen."""
        seen: list[aioworkers.QueueDepth] = []

        async def reached() -> bool:
            seen.append(await self.depth(queue))
            return seen[-1] == expected

        try:
            await wait_until(reached, within=within, what=f"{queue!r} at {expected}")
        except AssertionError:
            raise AssertionError(f"{queue!r} is at {seen[-1]}, expected {expected}") from None

    async def held_by(self, worker: WorkerProcess, queue: str = "default") -> list[Any]:
        """The stream ids of the entries pending for ``worker``'s consumer."""
        return [
            row["message_id"]
            for row in await self.pending(queue)
            if consumer_pid(row["consumer"]) == worker.pid
        ]

    async def pending(self, queue: str = "default") -> list[dict[str, Any]]:
        """The stream's pending entries: message_id, consumer, times_delivered."""
        try:
            rows = await self.redis.xpending_range(self.stream(queue), "workers", "-", "+", 10_000)
        except rexc.ResponseError:
            return []  # no group yet
        return list(rows)

    async def job_ids_of(self, entry_ids: Sequence[Any], queue: str = "default") -> set[str]:
        """The job ids in stream entries (read from their envelopes)."""
        ids = set()
        for entry_id in entry_ids:
            for _, fields in await self.redis.xrange(self.stream(queue), entry_id, entry_id):
                ids.add(orjson.loads(fields[b"b"])["id"])
        return ids

    async def aclose(self, *, delete_keys: bool = True) -> None:
        for worker in self.workers:
            await worker.kill()
        for app in self._apps:
            with contextlib.suppress(Exception):
                await app.aclose()
        try:
            if not delete_keys:
                return
            keys = [k async for k in self.redis.scan_iter(match=f"{self.prefix}:*", count=1000)]
            if keys:
                await self.redis.delete(*keys)
        finally:
            await self.redis.aclose()


class RedisServer:
    """A redis-server of the test's own: AOF on, fsync always, in a temporary directory."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        log = self.dir / f"server-{self.starts}.log"
        with log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )

        async def ready() -> bool:
            client: Any = aioredis.from_url(self.url)
            try:
                # PING answers while the AOF is still loading; INFO says when it is done.
                info = await client.info("persistence")
                return bool(info.get("loading") == 0)
            except (rexc.ConnectionError, rexc.BusyLoadingError):
                return False
            finally:
                await client.aclose()

        await wait_until(ready, within=20, what=f"redis-server on port {self.port}")

    async def stop(self) -> None:
        """SIGTERM: a clean shutdown that flushes the AOF."""
        assert self.proc is not None
        self.proc.terminate()
        await asyncio.wait_for(self.proc.wait(), 20)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)


async def delayed_retry_took(app: aioworkers.App, delay: float) -> float:
    """Run a job that asks for a retry in ``delay`` seconds on ``app``; how long the retry
    took to start, seconds."""
    runs: list[float] = []

    @app.task
    async def later() -> None:
        runs.append(time.monotonic())
        if aioworkers.current_job().attempt == 1:
            raise aioworkers.Retry(delay=delay)

    await later.enqueue()
    async with app.worker(concurrency=2, poll=0.2):

        async def twice() -> bool:
            return len(runs) == 2

        await wait_until(twice, within=delay * 3 + 5, what="the retry")
    return runs[1] - runs[0]


async def check_a_poison_job_is_dead_lettered(e2e: E2E, *, visibility: float = 30.0) -> None:
    """A job that kills its worker reaches the DLQ after ``max_deliveries`` (2) runs, and
    the next worker goes on with the rest: the same test on every broker."""
    (poison,) = await e2e.enqueue(1, task="die")
    worker = await e2e.restart_until_dead_lettered(max_deliveries=2, visibility=visibility)
    (entry,) = await e2e.app.dlq().list()
    assert (entry.id, entry.task, entry.reason) == (poison, "die", "max_deliveries")
    runs = await e2e.redis.hget(e2e.keys.runs_started, poison)
    assert int(runs) == 2  # delivered 3 times, run twice, the third never ran
    assert worker.alive

    ids = await e2e.enqueue(5)
    await e2e.wait_done(5, within=20)
    assert (await e2e.ledger()).done == set(ids)
