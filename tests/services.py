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
