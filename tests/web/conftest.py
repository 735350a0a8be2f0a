"""Dashboards under test: an app on memory:// or on a SQLite file, its dead letters
written through the broker itself (no worker needed), and an HTTP client that talks to
the ASGI app in-process (httpx's ASGITransport)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from aioworkers import App
from aioworkers.brokers.base import DeadLetter
from aioworkers.envelope import Envelope, decode, encode, new_id, now_ms
from aioworkers.web import basic_auth, dashboard

USER, PASSWORD = "admin", "correct horse battery staple"
LOOPBACK = "http://127.0.0.1"


def make_app(kind: str, tmp_path: Path) -> App:
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/jobs.db"
    app = App(url)

    @app.task(retries=0)
    async def charge(card: str, amount: int) -> None:
        raise ValueError("card declined")

    return app


@pytest.fixture(params=["memory", "sqlite"])
async def app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[App]:
    app = make_app(request.param, tmp_path)
    try:
        yield app
    finally:
        await app.aclose()


async def bury(
    app: App,
    n: int,
    *,
    queue: str = "default",
    error: str = "ValueError: card declined",
    args: list[object] | None = None,
) -> list[str]:
    """Put ``n`` jobs of ``charge`` in the DLQ the way a worker does (fetch, dead_letter);
    returns their job ids."""
    broker = app.broker
    ids = []
    bodies = []
    for _ in range(n):
        env = Envelope(
            id=new_id(),
            task="charge",
            args=args if args is not None else ["4111-1111-1111-1111", 10],
            kwargs={},
            enqueued_at=now_ms(),
        )
        ids.append(env.id)
        bodies.append(encode(env))
    await broker.publish(queue, bodies)
    left = n
    while left:
        got = await broker.fetch(queue, max_messages=min(left, 500), wait=1.0, lease=30.0)
        for delivery in got:
            letter = DeadLetter(
                id=decode(delivery.body).id,
                task="charge",
                reason="max_retries",
                error=error,
                attempts=1,
                error_type="ValueError",
                traceback='Traceback (most recent call last):\n  File "x.py"\nValueError',
            )
            await broker.dead_letter(delivery, letter)
            left -= 1
    return ids


def client(
    asgi: object, *, auth: tuple[str, str] | None = (USER, PASSWORD), base: str = LOOPBACK
) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=asgi)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url=base, auth=auth)


def board(app: App, **options: object) -> object:
    options.setdefault("auth", basic_auth(USER, PASSWORD))
    return dashboard(app, **options)  # type: ignore[arg-type]


CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')
ENTRY = re.compile(r'name="entry" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no CSRF field in the page"
    return found[1]
