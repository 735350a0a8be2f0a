"""One end-to-end world per broker for the fault matrix: the per-broker harnesses
(`tests.e2e.harness.E2E` and its AMQP, SQS and SQLite kin) plus what the matrix asks of
every broker in the same words: queue names of the test's own, the jobs a worker held
when it died (where the broker can tell), raw bodies, and a broker restart.

The ledger (and the idempotency keys of the ``once`` task) always live in the shared
local Redis, so a restarted broker never takes the test's own records with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import orjson

from ..e2e.harness import E2E, RedisServer, WorkerProcess, wait_until
from ..e2e_amqp.harness import AmqpE2E
from ..e2e_postgres.harness import PostgresE2E
from ..e2e_sqlite.harness import SqliteE2E
from ..e2e_sqs.harness import SqsE2E
from ..services import REDIS, REDIS_URL, close_amqp_connections, ensure, moto_endpoint

BROKERS = ("redis", "amqp", "sqs", "sqlite", "postgres")
# SQS refuses a message over 256 KiB at publish: a worker never sees one.
SQS_MAX_BODY = 256 * 1024


class Matrix(E2E):
    """What every world adds to its harness: a world is a `Matrix` and its broker's `E2E`
    kin (``class AmqpWorld(Matrix, AmqpE2E)``), the Redis world is a `Matrix` alone."""

    name = ""
    # The biggest body the broker carries.
    max_body = 64 * 1024 * 1024
    # How late a delayed message may start, beyond 10 % of its delay (timer granularity).
    delay_slack = 0.0
    # Whether `depth` counts what other processes hold (RabbitMQ: only this one's).
    depth_shows_other_workers = True
    # (jobs, concurrency) of the SIGKILL case: a few seconds of work on this broker.
    kill_size = (600, 20)
    # (jobs, kills) of its soak variant.
    soak_size = (20_000, 4)
    # Jobs of the broker-restart case.
    restart_jobs = 300

    def queue_name(self, name: str) -> str:
        """The broker's queue for the test's queue ``name`` (its own, deleted afterwards)."""
        return name

    async def held(self, worker: WorkerProcess) -> set[str] | None:
        """The ids of the jobs leased to ``worker`` (alone on the queue) right now, or None
        if the broker cannot tell from outside."""
        return None

    async def after_restart(self) -> None:
        """Check what a broker restart must have restored beyond the jobs themselves."""

    async def publish_raw(self, bodies: Sequence[bytes], queue: str = "default") -> None:
        """Put ``bodies`` on the queue as they are: what a producer that is not ours sends."""
        await self.app.broker.publish(self.queue_name(queue), bodies)


class RedisWorld(Matrix):
    name = "redis"
    kill_size = (800, 50)
    soak_size = (100_000, 5)

    async def held(self, worker: WorkerProcess) -> set[str] | None:
        return await self.job_ids_of(await self.held_by(worker))


class OwnRedisWorld(RedisWorld):
    """Redis on a server of the test's own (for restarts); the ledger on the shared one."""

    def __init__(self, server: RedisServer, workdir: Path) -> None:
        super().__init__(REDIS_URL, workdir)
        self.broker_url = f"{server.url}?prefix={self.prefix}"
        self.extra_env = {"E2E_LEDGER_URL": REDIS_URL, "E2E_PREFIX": self.prefix}
        self.app = self.client()

    async def held(self, worker: WorkerProcess) -> set[str] | None:
        return None  # the broker's keys are not on the client the harness reads


class AmqpWorld(Matrix, AmqpE2E):
    name = "amqp"
    depth_shows_other_workers = False

    async def after_restart(self) -> None:
        async def one_consumer() -> bool:
            return await self.consumers() == 1

        # RabbitMQ's declare-ok has been seen to count 0 for a moment while `rabbitmqctl
        # list_consumers` showed the consumer active: wait for it, bounded.
        await wait_until(one_consumer, within=5, what="the consumer back on the queue")

    def queue_name(self, name: str) -> str:
        if name == "default":
            return self.queue
        queue = f"{self.queue}-{name}"
        self.queues |= {queue, f"{queue}.dead"}
        return queue


class SqsWorld(Matrix, SqsE2E):
    name = "sqs"
    max_body = SQS_MAX_BODY
    # Delays are whole seconds, and moto's long poll rechecks once a second.
    delay_slack = 1.0
    # Moto serves some tens to a few hundred messages a second: at 150 jobs a worker could
    # finish the 3/4 left after the kill point before the test saw it running one.
    kill_size = (300, 20)
    soak_size = (2_000, 3)
    restart_jobs = 100


class SqliteWorld(Matrix, SqliteE2E):
    name = "sqlite"

    async def held(self, worker: WorkerProcess) -> set[str] | None:
        def read() -> list[bytes]:
            with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as db:
                rows = db.execute(
                    "SELECT body FROM aioworkers_messages WHERE lease IS NOT NULL "
                    "AND visible_at > ?",
                    (time.time(),),
                ).fetchall()
            return [row[0] for row in rows]

        return {orjson.loads(body)["id"] for body in await asyncio.to_thread(read)}


class PostgresWorld(Matrix, PostgresE2E):
    """A database of the test's own (``host_port``: the server, or a forwarder to it)."""

    name = "postgres"

    async def held(self, worker: WorkerProcess) -> set[str] | None:
        return await PostgresE2E.held(self, worker, self.queue_name("default"))


def world(name: str, workdir: Path) -> Matrix:
    """The world of broker ``name`` on the shared local servers."""
    ensure(REDIS)
    if name == "redis":
        return RedisWorld(REDIS_URL, workdir)
    if name == "amqp":
        from ..services import RABBITMQ

        ensure(RABBITMQ)
        return AmqpWorld(workdir)
    if name == "sqs":
        return SqsWorld(workdir, moto_endpoint())
    if name == "postgres":
        return PostgresWorld(workdir)
    return SqliteWorld(workdir)


Restart = Callable[[], Awaitable[None]]


@asynccontextmanager
async def restartable(name: str, workdir: Path) -> AsyncIterator[tuple[Matrix, Restart]]:
    """A world whose broker the test can restart, and the restart: Redis, a server of the
    test's own with AOF on (stopped cleanly, started again); RabbitMQ, every connection
    closed by the server (the shared server is not restarted under other tests); SQS, the
    endpoint the workers talk to (moto keeps queues in memory only, so restarting moto
    itself would lose messages, which SQS never does)."""
    if name == "redis":
        server = RedisServer(workdir)
        await server.start()

        async def restart_redis() -> None:
            await server.stop()
            await asyncio.sleep(1.0)
            await server.start()

        try:
            async with _closing(OwnRedisWorld(server, workdir)) as own:
                yield own, restart_redis
        finally:
            await server.kill()
    elif name == "amqp":
        async with _closing(world(name, workdir)) as amqp:
            yield amqp, close_amqp_connections
    elif name == "sqs":
        endpoint = moto_endpoint()
        host, port = endpoint.removeprefix("http://").split(":")
        async with (
            Endpoint(host, int(port)) as proxy,
            _closing(SqsWorld(workdir, proxy.url)) as sqs,
        ):
            yield sqs, proxy.restart
    elif name == "postgres":
        # A failover as the workers see it: every connection cut, new ones refused for a
        # second, then a server on the same address (the shared server stays up).
        async with (
            Endpoint("127.0.0.1", 5432) as proxy,
            _closing(PostgresWorld(workdir, host_port=f"127.0.0.1:{proxy.port}")) as pg,
        ):
            yield pg, proxy.restart
    else:
        raise ValueError(f"{name}: no restart")


@asynccontextmanager
async def _closing(world: Matrix) -> AsyncIterator[Matrix]:
    try:
        yield world
    finally:
        await world.aclose()


class Endpoint:
    """A TCP forwarder to ``host:port`` that can be restarted: `restart` closes every
    connection and refuses new ones for a second, then listens on the same port again
    (what a client sees of a server restart)."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = 0
        self.cut = 0  # connections closed by restarts
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Endpoint:
        await self._listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def restart(self, down: float = 1.0) -> None:
        cut = self.cut
        await self._stop()
        assert self.cut > cut, "no connection was open to cut"
        await asyncio.sleep(down)
        await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        self.cut += len(self._open) // 2
        for writer in list(self._open):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._open.clear()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        self._open |= {client_w, server_w}
        for reader, writer in ((client_r, server_w), (server_r, client_w)):
            task = asyncio.create_task(self._pump(reader, writer, (client_w, server_w)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ends: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            for end in ends:
                end.close()
                self._open.discard(end)


RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ([\w.]+): ", re.MULTILINE)


def own_tracebacks(worker: WorkerProcess) -> list[str]:
    """The records of aioworkers' own loggers in ``worker``'s log that carry a traceback
    (a client library may log its own, e.g. aiormq on a connection the server closed)."""
    log = worker.log()
    found = list(RECORD.finditer(log))
    ends = [m.start() for m in found[1:]] + [len(log)]
    return [
        log[m.start() : end]
        for m, end in zip(found, ends, strict=True)
        if m[1].startswith("aioworkers") and "Traceback" in log[m.start() : end]
    ]


def counts(worker: WorkerProcess) -> dict[str, int]:
    """The outcome counts ``worker`` logged when it stopped (``ok=3 retried=0 ...``)."""
    (summary,) = re.findall(r"worker stopped .*> (.*)", worker.log())
    return {name: int(n) for name, n in (item.split("=") for item in summary.split())}
