"""Benchmark harness: aioworkers against a raw client loop, same broker, same run.

    python benchmarks/run.py [--quick | --smoke] [--only W1,W2]
                             [--broker redis|amqp|sqs|sqlite|postgres]
                             [--sides raw,aioworkers[,procrastinate]]

Each workload runs for every side, each in its own fresh worker subprocess (so peak RSS
is per side), with the sides' order rotating between repeats; every figure is reported
as a ratio to the raw loop measured in the same run, because absolute numbers on a shared
machine mean little. ``--otel off,metrics,traces,all`` adds aioworkers sides with
OpenTelemetry configured (``aio-off``, ``aio-metrics``, ``aio-traces``, ``aio-otel``),
reported as ratios to the plain aioworkers side of the same run. Results go to
``benchmarks/results/<mode>.{json,md,png}``. See benchmarks/README.md for what each
figure means.

Every key this run creates lives under its own prefix ``aiowbench-<pid>-<random>:`` and is
deleted after each trial and on exit; no other key is read or written. With ``--broker
amqp`` the queues are named ``<prefix>.…`` and deleted after each trial; with ``--broker
sqs`` the harness starts its own moto server (killed on exit); with ``--broker sqlite`` each
trial gets a fresh database file in a temporary directory, deleted after the trial; with
``--broker postgres`` each trial gets a database of its own on ``--pg-url``'s server
(created, migrated for aioworkers, and dropped after the trial). Completions are counted
in Redis on every broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from _child import Spec, run
from _raw_sqlite import INSERT as SQLITE_INSERT
from _raw_sqlite import SCHEMA as SQLITE_SCHEMA
from _raw_sqlite import connect as sqlite_connect
from _report import collect_meta, markdown, summarize, summarize_otel, write_chart

import aioworkers
from aioworkers.envelope import Envelope, encode, new_id, now_ms

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIDES = {
    "raw": HERE / "_raw.py",
    "aioworkers": HERE / "_aio.py",
    # --broker postgres only: the peer, procrastinate (installed apart: the bench extra).
    "procrastinate": HERE / "_procrastinate.py",
}
# --otel modes and the extra aioworkers side each adds (side names end up in Redis keys,
# AMQP and SQS queue names: letters, digits and hyphens only).
OTEL_SIDES = {
    "off": "aio-off",
    "metrics": "aio-metrics",
    "traces": "aio-traces",
    "all": "aio-otel",
    "sampled": "aio-sampled",
}
OTEL_MODES = {side: mode for mode, side in OTEL_SIDES.items()}
RAW_SIDES = {
    "redis": HERE / "_raw.py",
    "amqp": HERE / "_raw_amqp.py",
    "sqs": HERE / "_raw_sqs.py",
    "sqlite": HERE / "_raw_sqlite.py",
    "postgres": HERE / "_raw_postgres.py",
}
WORKLOADS = ("W0", "W1", "W2", "W3", "RSS", "W4", "W5")
# RSS (queue depths of 50k-200k) is left out by default on amqp and sqs: filling RabbitMQ
# with persistent confirmed messages, or moto at ~60 msg/s, takes too long. W4 and W5
# (aioworkers alone: the raw loops have one queue and no retries) run when asked (--only).
DEFAULT_WORKLOADS = {
    "redis": WORKLOADS[:5],
    "amqp": WORKLOADS[:4],
    "sqs": WORKLOADS[:4],
    "sqlite": WORKLOADS[:5],
    "postgres": WORKLOADS[:5],
}
AIO_ONLY = frozenset({"W4", "W5"})
W4_QUEUES = 20  # W4: one worker on this many queues, the jobs spread over them
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SQS_ENV = {
    # Dummy credentials: the harness only ever talks to its own moto server on 127.0.0.1.
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
GROUP = "workers"
ENQUEUE_CHUNK = 1000


@dataclass(frozen=True)
class Preset:
    repeat: int  # runs of W0-W3 per side (medians reported); RSS runs once per depth
    concurrency: int  # W0, W1, W3, RSS
    w0_jobs: int
    w1_jobs: int
    w2_jobs: int
    w2_concurrency: int
    w2_sleep: float
    w3_rate: float  # jobs/s
    w3_seconds: float
    w3_warmup: float  # seconds of samples dropped at the start
    rss_depths: tuple[int, int]  # jobs queued
    rss_jobs: int  # jobs processed at each depth
    timeout: float  # per child

    @property
    def w2_ideal(self) -> float:
        return self.w2_jobs * self.w2_sleep / self.w2_concurrency


PRESETS = {
    "full": Preset(
        3, 100, 20_000, 20_000, 10_000, 500, 0.05, 500, 4.0, 0.5, (20_000, 200_000), 10_000, 300
    ),
    "quick": Preset(
        1, 100, 5_000, 5_000, 5_000, 500, 0.05, 500, 2.0, 0.5, (5_000, 50_000), 3_000, 120
    ),
    "smoke": Preset(1, 100, 300, 300, 1_000, 500, 0.05, 200, 1.0, 0.25, (300, 1_500), 200, 30),
}
# moto's SQS does ~50-70 messages/s: a few hundred jobs, W2 and W3 scaled down.
SQS_PRESETS = {
    "full": Preset(3, 100, 500, 500, 500, 100, 0.5, 20, 6.0, 1.0, (500, 2_000), 300, 300),
    "quick": Preset(1, 100, 300, 300, 300, 100, 0.5, 20, 5.0, 1.0, (300, 1_000), 200, 180),
    "smoke": Preset(1, 100, 50, 50, 50, 50, 0.2, 10, 2.0, 0.5, (50, 100), 50, 60),
}


@dataclass(frozen=True)
class Trial:
    workload: str
    side: str
    rep: int = 0
    depth: int = 0  # RSS: jobs queued

    @property
    def queue(self) -> str:
        return f"{self.workload.lower()}-{self.rep}" + (f"-{self.depth}" if self.depth else "")

    def __str__(self) -> str:
        where = f"@{self.depth:,}" if self.depth else f"#{self.rep + 1}"
        return f"{self.workload:<3} {where:<8} {self.side:<11}"


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


def envelope(task: str, args: list[Any]) -> bytes:
    """The bytes aioworkers would write: both sides read exactly the same messages."""
    return encode(Envelope(new_id(), task, args, {}, enqueued_at=now_ms()))


class Harness:
    def __init__(self, args: argparse.Namespace, preset: Preset) -> None:
        self.preset = preset
        self.url: str = args.url
        self.uvloop = not args.no_uvloop
        self.run_id = f"aiowbench-{os.getpid()}-{secrets.token_hex(3)}"
        self.redis = aioredis.from_url(self.url)
        self.broker = args.broker
        self.amqp_url: str = args.amqp_url
        self.moto: subprocess.Popen[bytes] | None = None
        self.sqs_endpoint = ""
        self.sqlite_dir = ""  # sqlite: this trial's temporary directory
        self.sqlite_path = ""
        self.sqlite: sqlite3.Connection | None = None  # the raw side's producer
        self.pg_url: str = args.pg_url  # postgres: the server's admin URL
        self.pg_db = ""  # postgres: this trial's database
        self.pg_trials = 0
        self.pg: Any = None  # postgres: asyncpg connection of the raw side's producer
        self.peer: Any = None  # postgres: the procrastinate App that defers its side's jobs
        self.env = dict(os.environ)
        if self.broker == "amqp":
            self.broker_url = self.amqp_url
        elif self.broker == "sqs":
            os.environ.update(SQS_ENV)
            self.env.update(SQS_ENV)
            self.sqs_endpoint = self.start_moto()
            self.broker_url = "sqs://?" + urlencode(
                {
                    "region": "us-east-1",
                    "endpoint_url": self.sqs_endpoint,
                    "prefix": f"{self.run_id}-",
                }
            )
        elif self.broker in ("sqlite", "postgres"):
            self.broker_url = "memory://"  # replaced by each trial's own file or database
        else:
            self.broker_url = with_query(self.url, prefix=f"{self.run_id}:aio")
        self.app = aioworkers.App(self.broker_url)
        self.amqp: Any = None  # aio-pika connection of the raw side's publisher
        self.amqp_channel: Any = None
        self.sqs_stack: Any = None
        self.sqs: Any = None  # aiobotocore client of the raw side's producer
        # The children measure this checkout, whatever else is installed.
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        )

    def start_moto(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self.env,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if self.moto.poll() is not None or time.monotonic() > deadline:
                    self.moto.kill()
                    raise RuntimeError(f"the moto server did not start on port {port}") from None
                time.sleep(0.1)
        return f"http://127.0.0.1:{port}"

    async def aclose(self) -> None:
        try:
            await self.cleanup()
        finally:
            await self.app.aclose()
            self.remove_sqlite_file()
            await self.drop_postgres_db()
            await self.redis.aclose()
            if self.amqp is not None:
                await self.amqp.close()
            if self.sqs_stack is not None:
                await self.sqs_stack.aclose()
            if self.moto is not None:
                self.moto.kill()
                self.moto.wait()

    async def amqp_publisher(self) -> Any:
        if self.amqp_channel is None:
            import aio_pika

            self.amqp = await aio_pika.connect(self.amqp_url)
            self.amqp_channel = await self.amqp.channel(publisher_confirms=True)
        return self.amqp_channel

    async def sqs_client(self) -> Any:
        if self.sqs is None:
            import contextlib

            from aiobotocore.session import get_session

            self.sqs_stack = contextlib.AsyncExitStack()
            self.sqs = await self.sqs_stack.enter_async_context(
                get_session().create_client(
                    "sqs", region_name="us-east-1", endpoint_url=self.sqs_endpoint
                )
            )
        return self.sqs

    async def new_sqlite_file(self) -> None:
        """sqlite: a fresh database file for the trial, and an app that enqueues to it."""
        await self.app.aclose()
        self.sqlite_dir = tempfile.mkdtemp(prefix=f"{self.run_id}-")
        self.sqlite_path = os.path.join(self.sqlite_dir, "jobs.db")
        self.broker_url = f"sqlite:///{self.sqlite_path}"  # an absolute path: four slashes
        self.app = aioworkers.App(self.broker_url)

    @property
    def worker_url(self) -> str:
        """The URL the aioworkers side's worker runs on: on postgres with its leases and acks
        committed as the raw loop's and procrastinate's are (``?async_commit=on``, the same
        durability; aioworkers' default is durable)."""
        if self.broker == "postgres":
            return f"{self.broker_url}?async_commit=on"
        return self.broker_url

    async def new_postgres_db(self) -> None:
        """postgres: a fresh database for the trial, migrated, and an app that enqueues to
        it; the raw side's table is made in `create_raw_queue`."""
        import asyncpg

        await self.app.aclose()
        self.pg_trials += 1
        name = f"{self.run_id.replace('-', '_')}_{self.pg_trials}"
        admin = await asyncpg.connect(self.pg_url)
        try:
            await admin.execute(f"CREATE DATABASE {name}")
        finally:
            await admin.close()
        self.pg_db = name
        self.broker_url = urlunsplit(urlsplit(self.pg_url)._replace(path=f"/{name}"))
        self.app = aioworkers.App(self.broker_url)
        await self.app.migrate()

    async def drop_postgres_db(self) -> None:
        import asyncpg

        if self.pg is not None:
            await self.pg.close()
            self.pg = None
        if self.peer is not None:
            await self.peer.close_async()
            self.peer = None
        if self.pg_db:
            await self.app.aclose()
            admin = await asyncpg.connect(self.pg_url)
            try:
                await admin.execute(f"DROP DATABASE IF EXISTS {self.pg_db} WITH (FORCE)")
            finally:
                await admin.close()
            self.pg_db = ""

    def remove_sqlite_file(self) -> None:
        if self.sqlite is not None:
            self.sqlite.close()
            self.sqlite = None
        if self.sqlite_dir:
            shutil.rmtree(self.sqlite_dir, ignore_errors=True)
            self.sqlite_dir = ""

    async def delete_queues(self, spec: Spec) -> None:
        """amqp, sqs: delete the queues this trial declared (and nothing else); sqlite:
        close the trial's file and delete its directory."""
        if self.broker == "sqlite":
            await self.app.aclose()
            self.remove_sqlite_file()
        elif self.broker == "postgres":
            await self.drop_postgres_db()
        elif self.broker == "amqp":
            import aio_pika

            conn = await aio_pika.connect(self.amqp_url)
            try:
                channel = await conn.channel()
                dead = [f"{queue}.dead" for queue in spec.queue_names()]
                for name in (spec.stream, *spec.queue_names(), *dead):
                    if name:
                        await channel.queue_delete(name)
            finally:
                await conn.close()
        elif self.broker == "sqs":
            sqs = await self.sqs_client()
            listed = await sqs.list_queues(QueueNamePrefix=self.run_id)
            for url in listed.get("QueueUrls", ()):
                await sqs.delete_queue(QueueUrl=url)

    async def cleanup(self) -> int:
        """Delete every key under this run's prefix (and nothing else)."""
        deleted = 0
        batch: list[bytes] = []
        async for key in self.redis.scan_iter(match=f"{self.run_id}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await self.redis.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await self.redis.unlink(*batch)
        return deleted

    def spec(self, t: Trial) -> tuple[Spec, int]:
        """The child's spec, and how many jobs to enqueue before it starts."""
        p = self.preset
        queue, stream = t.queue, ""
        if t.side in OTEL_MODES:
            # Its own queue name (SQS refuses to recreate a just-deleted name for 60 s).
            queue = f"{t.side}-{t.queue}"
        if t.side == "raw" and self.broker == "redis":
            stream = f"{self.run_id}:raw:{{{t.queue}}}:stream"
        elif self.broker == "amqp":
            queue = f"{self.run_id}.{t.side}.{t.queue}"
            stream = queue if t.side == "raw" else ""
        elif self.broker == "sqs":
            # aioworkers' queue gets the run's prefix from the URL; the raw one spells it.
            stream = f"{self.run_id}-raw-{queue}" if t.side == "raw" else ""
        task, queued, target = {
            "W0": ("w0", p.w0_jobs, p.w0_jobs),
            "W1": ("w1", p.w1_jobs, p.w1_jobs),
            "W2": ("w2", p.w2_jobs, p.w2_jobs),
            "W3": ("w3", 0, int(p.w3_rate * p.w3_seconds)),
            "RSS": ("w1", t.depth, p.rss_jobs),
            "W4": ("w1", p.w1_jobs, p.w1_jobs),
            "W5": ("w5", p.w1_jobs, p.w1_jobs),
        }[t.workload]
        spec = Spec(
            workload=t.workload,
            task=task,
            redis_url=self.url,
            queue=queue,
            counter=f"{self.run_id}:{t.side}:{t.queue}:counter",
            target=target,
            concurrency=p.w2_concurrency if t.workload == "W2" else p.concurrency,
            timeout=p.timeout,
            stream=stream,
            raw_url={
                "amqp": self.amqp_url,
                "sqs": self.sqs_endpoint,
                "sqlite": self.sqlite_path,
                "postgres": self.broker_url,
            }.get(self.broker, "")
            if t.side in ("raw", "procrastinate")
            else "",
            broker_url=self.worker_url if t.side != "raw" else "",
            sleep=p.w2_sleep,
            warmup=int(p.w3_rate * p.w3_warmup),
            uvloop=self.uvloop,
            otel=OTEL_MODES.get(t.side, ""),
            queues=W4_QUEUES if t.workload == "W4" else 1,
        )
        return spec, queued

    async def trial(self, t: Trial) -> dict[str, Any]:
        if self.broker == "sqlite":
            await self.new_sqlite_file()
        elif self.broker == "postgres":
            await self.new_postgres_db()
        spec, queued = self.spec(t)
        try:
            if t.side == "raw":
                await self.create_raw_queue(spec)
            elif t.side == "procrastinate":
                await self.open_peer()
            await self.enqueue(t, spec, queued)
            result = await self.spawn(t, spec)
            counter = int(await self.redis.get(spec.counter) or 0)
        finally:
            try:
                await self.delete_queues(spec)
            finally:
                await self.cleanup()
        error = result.get("error")
        expected = spec.target
        if not error and (counter < expected if t.workload == "RSS" else counter != expected):
            error = f"counter is {counter}, expected {expected}"
        return {
            **asdict(t),
            **result,
            "jobs": spec.target,
            "queued": queued,
            "counter": counter,
            "ideal": self.preset.w2_ideal if t.workload == "W2" else None,
            "error": error,
        }

    async def create_raw_queue(self, spec: Spec) -> None:
        if self.broker == "amqp":
            channel = await self.amqp_publisher()
            await channel.declare_queue(spec.stream, durable=True)
        elif self.broker == "sqs":
            await (await self.sqs_client()).create_queue(QueueName=spec.stream)
        elif self.broker == "sqlite":
            # As aioworkers' producer: WAL, synchronous=NORMAL (no fsync per commit).
            self.sqlite = sqlite_connect(self.sqlite_path)
            self.sqlite.executescript(SQLITE_SCHEMA)
        elif self.broker == "postgres":
            import asyncpg
            from _raw_postgres import SCHEMA as PG_SCHEMA

            self.pg = await asyncpg.connect(self.broker_url)
            await self.pg.execute(PG_SCHEMA)
        else:
            await self.redis.xgroup_create(spec.stream, GROUP, "0", mkstream=True)

    async def open_peer(self) -> None:
        """postgres, the procrastinate side: its schema in the trial's database, and an App
        of its own to defer with."""
        from _procrastinate import make_app

        self.peer = make_app(self.broker_url)
        await self.peer.open_async()
        await self.peer.schema_manager.apply_schema_async()

    async def defer_peer(self, spec: Spec, args: list[list[Any]]) -> None:
        """The procrastinate side's producer: its own API, one statement per call."""
        deferrer = self.peer.configure_task(spec.task, queue=spec.queue)
        if len(args) == 1:
            await deferrer.defer_async(args=args[0])
        else:
            await deferrer.batch_defer_async(*({"args": a} for a in args))

    async def publish_raw(self, spec: Spec, bodies: list[bytes]) -> None:
        """The raw side's producer: XADD; persistent messages with publisher confirms;
        SendMessageBatch; an INSERT per message, one transaction per call (on the parent's
        loop: the inserts are short, and the parent is not measured)."""
        if self.broker == "amqp":
            import aio_pika

            channel = await self.amqp_publisher()
            exchange = channel.default_exchange
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(b, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=spec.stream,
                    )
                    for b in bodies
                )
            )
        elif self.broker == "sqs":
            sqs = await self.sqs_client()
            url = (await sqs.get_queue_url(QueueName=spec.stream))["QueueUrl"]
            for start in range(0, len(bodies), 10):
                entries = [
                    {"Id": str(i), "MessageBody": b.decode()}
                    for i, b in enumerate(bodies[start : start + 10])
                ]
                await sqs.send_message_batch(QueueUrl=url, Entries=entries)
        elif self.broker == "sqlite":
            assert self.sqlite is not None
            now = time.time()
            self.sqlite.execute("BEGIN IMMEDIATE")
            self.sqlite.executemany(SQLITE_INSERT, [(spec.queue, b, now) for b in bodies])
            self.sqlite.execute("COMMIT")
        elif self.broker == "postgres":
            from _raw_postgres import INSERT as PG_INSERT

            await self.pg.execute(PG_INSERT, spec.queue, bodies)  # one statement, and a NOTIFY
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for b in bodies:
                    pipe.xadd(spec.stream, {"b": b})
                await pipe.execute()

    async def enqueue(self, t: Trial, spec: Spec, n: int) -> None:
        for start in range(0, n, ENQUEUE_CHUNK):
            ids = range(start, min(n, start + ENQUEUE_CHUNK))
            if t.side == "raw":
                await self.publish_raw(spec, [envelope(spec.task, [i]) for i in ids])
            elif t.side == "procrastinate":
                await self.defer_peer(spec, [[i] for i in ids])
            else:
                queues = spec.queue_names()  # W4: spread over its queues
                calls = (
                    aioworkers.Call(spec.task, (i,), queue=queues[i % len(queues)]) for i in ids
                )
                await self.app.enqueue_many(calls)

    async def produce(self, t: Trial, spec: Spec) -> None:
        """W3: enqueue at a steady rate while the worker runs; each job carries its send
        time (wall clock, comparable across processes on one machine)."""
        rate = self.preset.w3_rate
        start = time.perf_counter()
        for seq in range(spec.target):
            wait = start + seq / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            if t.side == "raw":
                sent = time.time()
                await self.publish_raw(spec, [envelope("w3", [sent, seq])])
            elif t.side == "procrastinate":
                await self.defer_peer(spec, [[time.time(), seq]])
            else:
                await self.app.enqueue("w3", args=[time.time(), seq], queue=spec.queue)

    async def spawn(self, t: Trial, spec: Spec) -> dict[str, Any]:
        script = (
            RAW_SIDES[self.broker] if t.side == "raw" else SIDES.get(t.side, SIDES["aioworkers"])
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            spec.to_json(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        stderr = asyncio.create_task(proc.stderr.read())
        producer: asyncio.Task[None] | None = None
        result: dict[str, Any] | None = None
        try:
            async with asyncio.timeout(spec.timeout + 30):
                async for line in proc.stdout:
                    text = line.decode().strip()
                    if text == "READY" and t.workload == "W3":
                        producer = asyncio.create_task(self.produce(t, spec))
                    elif text.startswith("RESULT "):
                        result = json.loads(text.removeprefix("RESULT "))
                await proc.wait()
            if producer is not None:
                await producer
        except TimeoutError:
            pass
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if producer is not None and not producer.done():
                producer.cancel()
        err = (await stderr).decode(errors="replace").strip()
        if result is None:
            tail = "\n".join(err.splitlines()[-15:])
            return {"error": f"child exited {proc.returncode} without a result:\n{tail}"}
        if err:
            result["stderr"] = err[-2000:]
        return result

    def trials(self, workloads: list[str], sides: list[str]) -> Iterator[Trial]:
        for workload in workloads:
            if workload == "RSS":
                for depth in self.preset.rss_depths:
                    yield from (Trial("RSS", side, 0, depth) for side in sides)
                continue
            if workload in AIO_ONLY:
                sides = [side for side in sides if side != "raw"]
            for rep in range(self.preset.repeat):
                # Rotate which side goes first (two sides: alternate), so drift in the
                # machine's load evens out.
                shift = rep % len(sides)
                order = sides[shift:] + sides[:shift]
                yield from (Trial(workload, side, rep) for side in order)


def brief(record: dict[str, Any]) -> str:
    if record["error"]:
        return "ERROR " + str(record["error"]).splitlines()[0]
    rss = f"rss {record['maxrss_mb']:.1f} MB"
    if record["workload"] == "W3":
        lat = record["latency_ms"]
        return f"p50 {lat.get('p50', 0):.2f} ms  p99 {lat.get('p99', 0):.2f} ms  {rss}"
    rate = record["jobs"] / record["elapsed"]
    extra = f"  efficiency {record['ideal'] / record['elapsed']:.2f}" if record["ideal"] else ""
    return f"{rate:,.0f} jobs/s{extra}  {rss}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller numbers, one repeat")
    size.add_argument("--smoke", action="store_true", help="a few hundred jobs (the test)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {WORKLOADS}")
    parser.add_argument("--broker", default="redis", choices=list(RAW_SIDES))
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0", help="the Redis to use")
    parser.add_argument("--amqp-url", default=AMQP_URL, help="the RabbitMQ for --broker amqp")
    parser.add_argument(
        "--pg-url", default=PG_URL, help="--broker postgres: a server where it may create databases"
    )
    parser.add_argument(
        "--sides",
        default="raw,aioworkers",
        help="raw, aioworkers or both (--otel adds its own); on postgres, procrastinate too",
    )
    parser.add_argument("--repeat", type=int, default=0, help="override the preset's repeat")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument(
        "--otel",
        nargs="?",
        const="all",
        default="",
        metavar="MODES",
        help="comma-separated subset of off, metrics, traces, all, sampled (bare --otel: "
        "all): each adds an aioworkers side with that OpenTelemetry configuration, reported as "
        "ratios to the plain aioworkers side",
    )
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    args.workloads = [w.strip().upper() for w in args.only.split(",") if w.strip()] or list(
        DEFAULT_WORKLOADS[args.broker]
    )
    args.side_list = [s.strip() for s in args.sides.split(",") if s.strip()]
    if unknown := set(args.workloads) - set(WORKLOADS):
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")
    if unknown := set(args.side_list) - set(SIDES):
        parser.error(f"unknown sides {sorted(unknown)}; choose from {list(SIDES)}")
    if "procrastinate" in args.side_list and args.broker != "postgres":
        parser.error("the procrastinate side runs on --broker postgres only")
    args.otel_modes = list(dict.fromkeys(m.strip() for m in args.otel.split(",") if m.strip()))
    if unknown := set(args.otel_modes) - set(OTEL_SIDES):
        parser.error(f"unknown --otel modes {sorted(unknown)}; choose from {list(OTEL_SIDES)}")
    if args.otel and not args.otel_modes:
        parser.error(f"--otel needs modes from {list(OTEL_SIDES)}")
    args.side_list = list(dict.fromkeys(args.side_list)) + [OTEL_SIDES[m] for m in args.otel_modes]
    if not args.side_list:
        parser.error("no side to run: give --sides or --otel")
    return args


async def main(args: argparse.Namespace) -> int:
    preset = (SQS_PRESETS if args.broker == "sqs" else PRESETS)[args.mode]
    if args.repeat:
        preset = Preset(**{**asdict(preset), "repeat": args.repeat})
    harness = Harness(args, preset)
    meta = await collect_meta(harness.redis, args, harness.run_id, asdict(preset))
    records: list[dict[str, Any]] = []
    print(f"aioworkers benchmark ({args.mode}), keys under {harness.run_id}:", file=sys.stderr)
    try:
        for t in harness.trials(args.workloads, args.side_list):
            record = await harness.trial(t)
            records.append(record)
            print(f"  {t} {brief(record)}", file=sys.stderr, flush=True)
    finally:
        await harness.aclose()
    meta["loadavg_end"] = list(os.getloadavg())
    meta["loops"] = sorted({r["loop"] for r in records if r.get("loop")})
    rows = summarize(records)
    otel_rows = summarize_otel(records, OTEL_MODES)
    name = (
        args.mode
        if args.workloads == list(DEFAULT_WORKLOADS[args.broker])
        else f"{args.mode}-{'-'.join(args.workloads)}"
    )
    if args.broker != "redis":
        name = f"{args.broker}-{name}"
    if args.otel_modes:
        name += "-otel-" + "-".join(args.otel_modes)
    meta["otel"] = {OTEL_SIDES[m]: m for m in args.otel_modes}
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "summary": rows, "otel_overhead": otel_rows, "records": records}
    (args.out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown(rows, meta, otel_rows)
    if "procrastinate" in args.side_list:
        from _procrastinate import peer_markdown

        table += peer_markdown(records)
    (args.out / f"{name}.md").write_text(table)
    if not write_chart(rows, meta, args.out / f"{name}.png"):
        print("matplotlib is not installed: no chart", file=sys.stderr)
    print(table)
    print(f"written to {args.out / name}.{{json,md,png}}", file=sys.stderr)
    failed = [r for r in records if r["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    options = parse_args()
    code = run(main(options), use_uvloop=not options.no_uvloop)
    sys.exit(code)
