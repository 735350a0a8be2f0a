"""Real broker servers for the tests: reachable, started if installed, or skipped.

A server that is down is started with the machine's own command when its binary is
installed; otherwise its tests are skipped with the reason, except under ``CI``, where a
missing broker fails the run instead of passing it with nothing tested.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Service:
    name: str
    host: str
    port: int
    binary: str
    start: tuple[str, ...]
    timeout: float = 30.0


REDIS = Service(
    "Redis",
    "127.0.0.1",
    6379,
    "redis-server",
    (
        "redis-server",
        "--daemonize",
        "yes",
        "--bind",
        "127.0.0.1",
        "-::1",
        "--port",
        "6379",
        "--save",
        "",
        "--appendonly",
        "no",
    ),
)


RABBITMQ = Service(
    "RabbitMQ",
    "127.0.0.1",
    5672,
    "rabbitmq-server",
    ("rabbitmq-server", "-detached"),
    timeout=90.0,
)
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _pg_version() -> str:
    """The installed PostgreSQL cluster version (Debian's /etc/postgresql/<version>)."""
    try:
        return sorted(os.listdir("/etc/postgresql"), key=lambda v: float(v))[-1]
    except (OSError, ValueError, IndexError):
        return "15"


POSTGRES = Service(
    "PostgreSQL",
    "127.0.0.1",
    5432,
    "pg_ctlcluster",
    ("pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", "start"),
)
# Trust authentication on 127.0.0.1; each test creates a database of its own.
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure(service: Service) -> None:
    """Make sure ``service`` is up, or skip (fail under CI) saying why."""
    if reachable(service.host, service.port):
        return
    why = f"{service.name} is not reachable on {service.host}:{service.port}"
    if shutil.which(service.binary) is None:
        _give_up(f"{why} and {service.binary} is not installed")
    subprocess.run(service.start, check=False, capture_output=True, timeout=60)
    deadline = time.monotonic() + service.timeout
    while time.monotonic() < deadline:
        if reachable(service.host, service.port):
            return
        time.sleep(0.2)
    _give_up(f"{why}, and starting it with {' '.join(service.start[:1])} did not help")


def _give_up(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: a missing broker is a failure)", pytrace=False)
    pytest.skip(reason)


REDIS_URL = "redis://127.0.0.1:6379/0"


async def delete_prefix(prefix: str, url: str = REDIS_URL) -> None:
    """Remove every key a test created under its own prefix (and nothing else)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# -- SQS: a moto server of the test session's own ----------------------------------------------

_MOTO: dict[str, object] = {}
SQS_ENV = {
    # Dummy credentials: the tests only ever talk to the moto server on 127.0.0.1.
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def moto_endpoint() -> str:
    """``http://127.0.0.1:PORT`` of a moto server started once per session (a subprocess,
    killed at exit); skips (fails under CI) if moto is not installed. Sets dummy AWS
    credentials in this process's environment."""
    import atexit
    import importlib.util
    import sys

    if "url" in _MOTO:
        return str(_MOTO["url"])
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("aiobotocore") is None:
        _give_up("moto[server] and aiobotocore are needed for the SQS tests")
    os.environ.update(SQS_ENV)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **SQS_ENV},
    )
    atexit.register(proc.kill)
    deadline = time.monotonic() + 30
    while not reachable("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _give_up(f"the moto server did not start on 127.0.0.1:{port}")
        time.sleep(0.1)
    _MOTO["url"] = f"http://127.0.0.1:{port}"
    _MOTO["proc"] = proc
    return str(_MOTO["url"])


def sqs_url(endpoint: str, **params: str) -> str:
    from urllib.parse import urlencode

    return "sqs://?" + urlencode({"region": "us-east-1", "endpoint_url": endpoint, **params})


async def delete_amqp_queues(names: set[str], url: str = AMQP_URL) -> None:
    """Delete the queues a test's broker declared (and nothing else)."""
    import aiormq

    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        for name in sorted(names):
            await channel.queue_delete(name)
    finally:
        await conn.close()


async def close_amqp_connections(reason: str = "test") -> None:
    """``rabbitmqctl close_all_connections``: RabbitMQ drops every client at once."""
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "close_all_connections",
        reason,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(proc.wait(), 30) == 0


# -- PostgreSQL: a database per test ------------------------------------------------------------


async def _create_database(prefix: str) -> tuple[str, str]:
    import uuid

    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    return name, f"postgresql://postgres@127.0.0.1:5432/{name}"


async def _drop_database(name: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@asynccontextmanager
async def postgres_database(prefix: str = "aw_test") -> AsyncIterator[str]:
    """A new, empty database (its URL), dropped afterwards with every connection to it."""
    ensure(POSTGRES)
    name, url = await _create_database(prefix)
    try:
        yield url
    finally:
        await _drop_database(name)


@contextmanager
def postgres_database_sync(prefix: str = "aw_test") -> Iterator[str]:
    """`postgres_database` for code without an event loop."""
    import asyncio

    ensure(POSTGRES)
    name, url = asyncio.run(_create_database(prefix))
    try:
        yield url
    finally:
        asyncio.run(_drop_database(name))
