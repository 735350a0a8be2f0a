"""Job handles across processes: real ``aioworkers run`` workers on Redis (its own store),
and on RabbitMQ and SQS with a Redis store; this process enqueues, waits, cancels and kills."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from aioworkers import App, JobCancelled, JobFailed

from ..services import (
    AMQP_URL,
    RABBITMQ,
    REDIS,
    REDIS_URL,
    SQS_ENV,
    delete_amqp_queues,
    delete_prefix,
    ensure,
    moto_endpoint,
    sqs_url,
)

LEASE = 1.5  # the cancel marks of running jobs are read every LEASE / 3

APP = """
import asyncio
import os
from pathlib import Path

from aioworkers import App, current_job

app = App(queue=os.environ["JOBS_QUEUE"], visibility_timeout=float(os.environ["JOBS_LEASE"]))
MARKS = Path(os.environ["JOBS_DIR"])


@app.task(result_ttl=3600, retries=0)
async def square(x: int) -> dict[str, int]:
    return {"x": x, "square": x * x, "pid": os.getpid()}


@app.task(result_ttl=3600, retries=0)
async def boom() -> None:
    raise ValueError("bad input")


@app.task(result_ttl=3600, retries=1, backoff=0.5, max_backoff=0.5)
async def flaky() -> None:
    await asyncio.sleep(0.3)
    raise RuntimeError("down")


@app.task(result_ttl=3600)
async def hold(name: str) -> str:
    job = current_job()
    (MARKS / f"{name}.started.{job.delivery_count}").write_text(str(os.getpid()))
    while not (MARKS / f"{name}.go").exists():
        await asyncio.sleep(0.02)
    with (MARKS / f"{name}.ran").open("a") as ran:
        ran.write("1")
    return name
"""


@dataclass
class World:
    env: dict[str, str]
    marks: Path
    module: str

    def app(self) -> App:
        return App(
            self.env["AIOWORKERS_BROKER_URL"],
            store=self.env.get("AIOWORKERS_STORE_URL"),
            queue=self.env["JOBS_QUEUE"],
            visibility_timeout=LEASE,
        )

    def register(self, app: App) -> None:
        # Producer side: the tasks known by name, so enqueue writes their records.
        for name in ("square", "boom", "flaky", "hold"):

            async def fn(*args: object) -> None: ...

            fn.__name__ = name
            app.task(name, result_ttl=3600)(fn)

    @contextmanager
    def worker(self) -> Iterator[subprocess.Popen[str]]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aioworkers", "run", f"{self.module}:app", "--grace", "5"],
            cwd=self.marks,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()

    async def wait_file(self, name: str, within: float = 15.0) -> None:
        # A file written by a worker process: polled (nothing here can signal it).
        async with asyncio.timeout(within):
            while True:
                if (self.marks / name).exists():
                    return
                await asyncio.sleep(0.02)


@asynccontextmanager
async def world(tmp_path: Path, case: str) -> AsyncIterator[World]:
    """``case``: the broker, and ``+sqlite`` for a SQLite store (else Redis's)."""
    broker, _, kind = case.partition("+")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    queue = f"handles-{uuid.uuid4().hex[:8]}"
    module = f"handlesapp_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(APP))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOWORKERS_")}
    env |= {"JOBS_QUEUE": queue, "JOBS_LEASE": str(LEASE), "JOBS_DIR": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *sys.path])
    store = f"sqlite:///{tmp_path}/state.db" if kind == "sqlite" else f"{REDIS_URL}?prefix={prefix}"
    ensure(REDIS)
    if broker == "redis":
        env["AIOWORKERS_BROKER_URL"] = f"{REDIS_URL}?prefix={prefix}"
    elif broker == "amqp":
        ensure(RABBITMQ)
        env["AIOWORKERS_BROKER_URL"] = AMQP_URL
        env["AIOWORKERS_STORE_URL"] = store
    else:
        env["AIOWORKERS_BROKER_URL"] = sqs_url(moto_endpoint(), prefix=f"{prefix}-")
        env["AIOWORKERS_STORE_URL"] = store
        env |= SQS_ENV
    try:
        yield World(env, tmp_path, module)
    finally:
        await delete_prefix(prefix)
        if broker == "amqp":
            await delete_amqp_queues({queue, f"{queue}.dead"})


@pytest.mark.parametrize("broker", ["redis", "amqp", "sqs", "amqp+sqlite", "sqs+sqlite"])
async def test_results_and_failures_round_trip(tmp_path: Path, broker: str) -> None:
    async with world(tmp_path, broker) as w, w.app() as app:
        w.register(app)
        jobs = await app.enqueue_many([app.tasks["square"].call(x) for x in range(20)])
        failed = await app.enqueue("boom")
        assert await jobs[0].status() == "queued"
        waiters = [asyncio.create_task(j.result(timeout=30)) for j in jobs]
        with w.worker(), w.worker():
            results = await asyncio.gather(*waiters)
            with pytest.raises(JobFailed) as error:
                await failed.result(timeout=30)
        assert [r["square"] for r in results] == [x * x for x in range(20)]
        assert os.getpid() not in {r["pid"] for r in results}
        assert error.value.error_type == "ValueError"
        assert await app.job(failed.id).status() == "failed"


async def test_status_running_then_succeeded_and_retrying_then_failed(tmp_path: Path) -> None:
    async with world(tmp_path, "redis") as w, w.app() as app:
        w.register(app)
        held = await app.enqueue("hold", ["a"])
        flaky = await app.enqueue("flaky")
        seen = {await held.status(), await flaky.status()}
        assert seen == {"queued"}
        with w.worker():
            await w.wait_file("a.started.1")
            assert await held.status() == "running"
            (w.marks / "a.go").touch()
            assert await held.result(timeout=15) == "a"
            statuses = [await flaky.status()]
            while statuses[-1] != "failed":
                status = await flaky.status()
                if status != statuses[-1]:
                    statuses.append(status)
                await asyncio.sleep(0.01)
        assert await held.status() == "succeeded"
        # "queued" before a worker saw it, "running" at each attempt (one may be missed
        # by the poll), "retrying" between them, "failed" at the end.
        assert statuses[-2:] in (["retrying", "failed"], ["running", "failed"])
        assert "retrying" in statuses
        assert (await flaky.info()).attempt == 2


@pytest.mark.parametrize("broker", ["redis", "amqp"])
async def test_cancel_a_running_job_and_a_queued_one(tmp_path: Path, broker: str) -> None:
    async with world(tmp_path, broker) as w, w.app() as app:
        w.register(app)
        queued = await app.enqueue("hold", ["q"])
        assert await queued.cancel() is True
        running = await app.enqueue("hold", ["r"])
        with w.worker():
            await w.wait_file("r.started.1")
            assert await app.cancel(running.id) is True
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(JobCancelled):
                await running.result(timeout=15)
            # One beat (LEASE / 3) plus the time of the round trips on a busy machine.
            assert loop.time() - start < LEASE
            (w.marks / "r.go").touch()
            (w.marks / "q.go").touch()
            await asyncio.sleep(2 * LEASE)  # long enough for a redelivery, if there were one
        assert not (w.marks / "q.started.1").exists()  # never started
        assert sorted(p.name for p in w.marks.glob("r.*")) == ["r.go", "r.started.1"]
        assert await running.status() == "cancelled"
        assert await queued.status() == "cancelled"
        assert await running.cancel() is False


async def test_sigkill_mid_job_the_result_appears_once(tmp_path: Path) -> None:
    async with world(tmp_path, "redis") as w, w.app() as app:
        w.register(app)
        job = await app.enqueue("hold", ["k"])
        waiter = asyncio.create_task(job.result(timeout=30))
        with w.worker() as first:
            await w.wait_file("k.started.1")
            assert await job.status() == "running"
            first.send_signal(signal.SIGKILL)
            first.wait()
        (w.marks / "k.go").touch()
        with w.worker():
            assert await waiter == "k"  # after its redelivery to the second worker
        assert (w.marks / "k.started.2").exists()
        assert (w.marks / "k.ran").read_text() == "1"
        info = await job.info()
        assert (info.status, info.attempt) == ("succeeded", 1)
