"""`@app.consumer` on the memory broker: decoding, the message, retries of the original
body, decode failures and DLQ replay (the broker-specific tests are beside this one)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

import aioworkers
from aioworkers import ConfigError, Message

from ._wait import until

POLL = 0.05


def _app() -> aioworkers.App:
    return aioworkers.App("memory://", backoff=0.01, max_backoff=0.01)


async def test_json_and_message() -> None:
    app = _app()
    got: list[tuple[Any, Message, Message]] = []

    @app.consumer("events")
    async def on_event(body: dict[str, Any], message: Message) -> None:
        got.append((body, message, aioworkers.current_message()))

    assert app.queues() == ["events"]
    await app.broker.publish("events", [b'{"a": 1}'])
    async with app.worker(poll=POLL):
        await until(lambda: got)
    body, message, current = got[0]
    assert body == {"a": 1}
    assert message is current
    assert (message.queue, message.body, message.attempt, message.delivery_count) == (
        "events",
        b'{"a": 1}',
        1,
        1,
    )


@pytest.mark.parametrize(
    ("decode", "raw", "expected"),
    [
        ("text", "héllo".encode(), "héllo"),
        ("bytes", b"\x00\xff", b"\x00\xff"),
        ("fields", b'{"user": "7"}', {"user": "7"}),
        ("sns", orjson.dumps({"Type": "Notification", "Message": '{"x": 2}'}), {"x": 2}),
        ("sns", b'{"x": 3}', {"x": 3}),  # raw message delivery on
        (lambda b: b.upper(), b"abc", b"ABC"),
    ],
)
async def test_decoders(decode: Any, raw: bytes, expected: Any) -> None:
    app = _app()
    got: list[Any] = []

    @app.consumer("q", decode=decode)
    async def on_message(body: Any) -> None:
        got.append(body)

    await app.broker.publish("q", [raw])
    async with app.worker(poll=POLL):
        await until(lambda: got)
    assert got == [expected]


async def test_garbage_is_dead_lettered_on_first_delivery() -> None:
    app = _app()
    calls = 0

    @app.consumer("q")
    async def on_message(body: Any) -> None:
        nonlocal calls
        calls += 1

    await app.broker.publish("q", [b"{not json"])
    async with app.worker(poll=POLL):
        await until(lambda: _dead(app))
        letters = await app.dlq("q").list()
    assert calls == 0
    assert [(d.reason, d.body, d.attempts) for d in letters] == [("decode_error", b"{not json", 1)]


def _dead(app: aioworkers.App) -> bool:
    q = app.broker._queues.get("q")  # type: ignore[attr-defined]
    return bool(q and q.dead)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_retries_keep_the_body_then_dlq_then_replay(kind: str, tmp_path: Path) -> None:
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/jobs.db"
    app = aioworkers.App(url, backoff=0.01, max_backoff=0.01)
    seen: list[tuple[bytes, int]] = []
    fail = True

    @app.consumer("q", retries=2)
    async def on_message(body: Any, message: Message) -> None:
        seen.append((message.body, message.attempt))
        if fail:
            raise RuntimeError("boom")

    await app.broker.publish("q", [b'{"n": 1}'])
    async with app.worker(poll=POLL):

        async def dead() -> bool:
            return len(await app.dlq("q").list()) == 1

        await until(dead)
        letters = await app.dlq("q").list()
        assert seen == [(b'{"n": 1}', 1), (b'{"n": 1}', 2), (b'{"n": 1}', 3)]
        assert [(d.reason, d.body, d.attempts) for d in letters] == [
            ("max_retries", b'{"n": 1}', 3)
        ]
        fail = False
        assert await app.dlq("q").replay() == 1
        await until(lambda: len(seen) == 4)
    assert seen[-1] == (b'{"n": 1}', 1)


async def test_idempotency_key_runs_once() -> None:
    app = _app()
    runs: list[str] = []

    @app.consumer("q", idempotency_key=lambda body, message: body["key"])
    async def on_message(body: dict[str, str]) -> None:
        runs.append(body["key"])

    await app.broker.publish("q", [b'{"key": "a"}', b'{"key": "a"}', b'{"key": "b"}'])
    async with app.worker(poll=POLL):
        await until(lambda: len(runs) >= 2)
        await asyncio.sleep(0.2)  # the duplicate has had its turn (nothing to wait on)
    assert sorted(runs) == ["a", "b"]


def test_a_queue_is_a_task_queue_or_a_consumer_queue() -> None:
    app = _app()

    @app.task(queue="jobs")
    async def job() -> None: ...

    with pytest.raises(ConfigError, match="task queue"):
        app.consumer("jobs")
    with pytest.raises(ConfigError, match="task queue"):
        app.consumer("default")
    app.consumer("events")(job.fn)
    with pytest.raises(ConfigError, match="consumer's queue"):
        app.task("other", queue="events")(job.fn)
    assert app.queues() == ["jobs", "events"]  # nothing is on the default queue


def test_bad_options_are_config_errors() -> None:
    app = _app()
    with pytest.raises(ConfigError, match="decode must be one of"):
        app.consumer("q", decode="xml")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs exchange="):
        app.consumer("q", routing_key="a.*")
    with pytest.raises(ConfigError, match="exchange_type"):
        app.consumer("q", exchange="e", exchange_type="nope")
    with pytest.raises(ConfigError, match="async def"):
        app.consumer("q")(lambda body: None)


async def test_exchange_needs_rabbitmq() -> None:
    app = _app()
    app.consumer("q", exchange="events")(_noop)
    with pytest.raises(ConfigError, match="amqp"):
        async with app.worker(poll=POLL):
            pass


async def _noop(body: Any) -> None: ...
