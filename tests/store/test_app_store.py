"""How an `App` picks its state store (``store=``, its old name ``idempotency=``,
``AIOWORKERS_STORE_URL``, the broker's default), and the rule on RabbitMQ and SQS: a
worker with a task that needs shared state refuses to start until a store is given."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from aioworkers import App, ConfigError, QueueDepth
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.brokers.sqlite import SqliteBroker
from aioworkers.store import ENV_STORE_URL, IdempotencyStore, MemoryStore, Store
from aioworkers.store.redis import RedisStore
from aioworkers.store.sqlite import SqliteStore

from ..services import (
    AMQP_URL,
    RABBITMQ,
    REDIS,
    REDIS_URL,
    delete_amqp_queues,
    ensure,
    moto_endpoint,
    sqs_url,
)
from .conftest import delete_keys

APPS = Path(__file__).parent / "apps"
NEEDS = ("store=", ENV_STORE_URL, "memory://")


@pytest.fixture(autouse=True)
def _no_store_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_STORE_URL, raising=False)


def _idempotent(app: App, runs: list[str]) -> None:
    @app.task(idempotent=True)
    async def charge(order: str) -> None:
        runs.append(order)


async def _charge_twice(app: App) -> list[str]:
    """Enqueue one key twice and run a worker until both are settled: the runs."""
    runs: list[str] = []
    _idempotent(app, runs)
    await app.enqueue("charge", ["first"], key="order-1")
    await app.enqueue("charge", ["second"], key="order-1")
    worker = app.worker(concurrency=1, poll=0.1)
    async with asyncio.timeout(20):
        await worker.run(burst=True)
    assert worker.counts == {"ok": 1, "duplicate": 1}
    return runs


# -- choosing the store ------------------------------------------------------------------------


async def test_a_store_url_or_instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert isinstance(App("memory://", store="memory://").store, MemoryStore)
    relative = App("memory://", store="sqlite:///state.db").store
    assert isinstance(relative, SqliteStore)
    assert relative.path == str(tmp_path / "state.db")  # from where the app started
    mine = MemoryStore()
    assert App("memory://", store=mine).store is mine
    redis_app = App("memory://", store=f"{REDIS_URL}?prefix=p")
    try:
        assert isinstance(redis_app.store, RedisStore)
        assert redis_app.store is redis_app.store
    finally:
        await redis_app.aclose()
    with pytest.raises(ConfigError, match="scheme must be one of") as info:
        App("memory://", store="mongodb://u:secret@h/db")
    assert "secret" not in str(info.value)
    with pytest.raises(ConfigError, match="store URL is empty"):
        App("memory://", store=" ")


def test_idempotency_is_the_old_name_of_store() -> None:
    mine = MemoryStore()
    assert App("memory://", idempotency=mine).store is mine
    assert isinstance(App("memory://", idempotency="memory://").store, MemoryStore)
    with pytest.raises(ConfigError, match="give store= only"):
        App("memory://", store=mine, idempotency=mine)


def test_the_environment_names_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_STORE_URL, f"sqlite:///{tmp_path}/env.db")
    store = App(AMQP_URL).store
    assert isinstance(store, SqliteStore)
    assert store.path == f"{tmp_path}/env.db"
    # An argument wins over the environment.
    assert isinstance(App(AMQP_URL, store="memory://").store, MemoryStore)
    monkeypatch.setenv(ENV_STORE_URL, "")
    with pytest.raises(ConfigError, match=f"{ENV_STORE_URL} is set but empty"):
        App(AMQP_URL)


async def test_the_default_store_follows_the_broker(tmp_path: Path) -> None:
    redis_app = App("redis://127.0.0.1:6379/3?prefix=shop&group=billing")
    try:
        store = redis_app.store
        assert isinstance(store, RedisStore)
        assert store.prefix == "shop:idempotency"  # the server and db of the broker
    finally:
        await redis_app.aclose()
    sqlite = App(f"sqlite:///{tmp_path}/jobs.db?poll=0.1").store
    assert isinstance(sqlite, SqliteStore)
    assert sqlite.path == f"{tmp_path}/jobs.db"
    by_file = App(SqliteBroker(f"sqlite:///{tmp_path}/other.db")).store
    assert isinstance(by_file, SqliteStore)
    assert by_file.path == f"{tmp_path}/other.db"
    memory, other = App("memory://"), App("memory://")
    assert isinstance(memory.store, MemoryStore)
    assert memory.store is memory.idempotency
    assert memory.store is not other.store
    assert isinstance(App(MemoryBroker()).store, MemoryStore)


@pytest.mark.parametrize("broker", [AMQP_URL, "amqps://h/", "sqs://?region=us-east-1"])
def test_rabbitmq_and_sqs_have_no_default_store(broker: str) -> None:
    app = App(broker)
    assert app.idempotency is None  # nothing needs one: the runtime runs without
    with pytest.raises(ConfigError) as info:
        _ = app.store
    assert all(word in str(info.value) for word in NEEDS)


def test_a_store_that_keeps_keys_only_is_refused_where_a_whole_store_is_needed() -> None:
    class KeysOnly:
        """An `IdempotencyStore` written before the state store existed."""

        def __init__(self) -> None:
            self.inner = MemoryStore()

        async def claim(self, key: str, owner: str, *, lease: float) -> str:
            return await self.inner.claim(key, owner, lease=lease)

        async def extend(
            self, claims: Sequence[tuple[str, str]], *, lease: float
        ) -> list[tuple[str, str]]:
            return await self.inner.extend(claims, lease=lease)

        async def complete(self, key: str, owner: str, *, ttl: float) -> bool:
            return await self.inner.complete(key, owner, ttl=ttl)

        async def release(self, key: str, owner: str) -> bool:
            return await self.inner.release(key, owner)

        async def aclose(self) -> None: ...

    keys = KeysOnly()
    assert isinstance(keys, IdempotencyStore)
    assert not isinstance(keys, Store)
    app = App("memory://", store=keys)  # type: ignore[arg-type]
    assert app.idempotency is keys
    with pytest.raises(ConfigError, match="keeps idempotency keys only"):
        _ = app.store


def test_a_redis_store_url_imports_redis_only_when_used() -> None:
    code = (
        "import sys, aioworkers\n"
        "app = aioworkers.App('memory://', store='redis://127.0.0.1:6379/0')\n"
        "assert 'redis' not in sys.modules, 'imported at App()'\n"
        "assert type(app.store).__name__ == 'RedisStore', app.store\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


# -- RabbitMQ and SQS: refuse to start, or share the given store --------------------------------


@pytest.fixture
async def amqp_app() -> AsyncIterator[App]:
    ensure(RABBITMQ)
    app = App(AMQP_URL, queue=f"store-{uuid.uuid4().hex[:12]}", visibility_timeout=5)
    try:
        yield app
    finally:
        await app.aclose()
        await delete_amqp_queues(app.broker.known_queues)  # type: ignore[attr-defined]


async def test_amqp_refuses_to_start_an_idempotent_task_without_a_store(amqp_app: App) -> None:
    runs: list[str] = []
    _idempotent(amqp_app, runs)  # registering it is fine: the check is at start-up
    await amqp_app.enqueue("charge", ["first"], key="order-1")
    with pytest.raises(ConfigError) as info:
        amqp_app.worker()
    assert "task 'charge' (idempotent=True)" in str(info.value)
    assert all(word in str(info.value) for word in NEEDS)
    assert "guest:guest" not in str(info.value)
    assert runs == []


async def test_amqp_without_a_store_runs_tasks_that_need_none(amqp_app: App) -> None:
    ran: list[int] = []

    @amqp_app.task
    async def plain(n: int) -> None:
        ran.append(n)

    await plain.enqueue(1)
    async with asyncio.timeout(20):
        await amqp_app.worker(poll=0.1).run(burst=True)
    assert ran == [1]


@pytest.mark.parametrize("store", ["redis", "sqlite", "memory"])
async def test_amqp_with_a_store_runs_a_key_once(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure(RABBITMQ)
    prefix = f"test-store-{uuid.uuid4().hex[:12]}"
    urls = {
        "redis": f"{REDIS_URL}?prefix={prefix}",
        "sqlite": f"sqlite:///{tmp_path}/state.db",
        "memory": "memory://",  # the explicit opt-out: this one process
    }
    if store == "redis":
        ensure(REDIS)
        monkeypatch.setenv(ENV_STORE_URL, urls[store])  # the environment's way
        app = App(AMQP_URL, queue=f"store-{prefix}", visibility_timeout=5)
    else:
        app = App(AMQP_URL, queue=f"store-{prefix}", visibility_timeout=5, store=urls[store])
    try:
        assert await _charge_twice(app) == ["first"]
        assert await app.stats() == QueueDepth()
    finally:
        await app.aclose()
        await delete_amqp_queues(app.broker.known_queues)  # type: ignore[attr-defined]
        await delete_keys(prefix)


async def test_sqs_refuses_an_idempotent_task_without_a_store_and_runs_it_with_one(
    tmp_path: Path,
) -> None:
    url = sqs_url(moto_endpoint())
    queue = f"store-{uuid.uuid4().hex[:12]}"
    bare = App(url, queue=queue, visibility_timeout=5)
    try:
        _idempotent(bare, [])
        with pytest.raises(ConfigError) as info:
            bare.worker()
        assert all(word in str(info.value) for word in NEEDS)
    finally:
        await bare.aclose()
    app = App(url, queue=queue, visibility_timeout=5, store=f"sqlite:///{tmp_path}/s.db")
    try:
        assert await _charge_twice(app) == ["first"]
    finally:
        await app.aclose()


def test_the_command_line_refuses_to_run_it_naming_the_store() -> None:
    env = {k: v for k, v in os.environ.items() if k != ENV_STORE_URL}
    env["AIOWORKERS_BROKER_URL"] = AMQP_URL
    result = subprocess.run(
        [sys.executable, "-m", "aioworkers", "run", "storeapp:app"],
        cwd=APPS,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "aioworkers: error: task 'charge' (idempotent=True) needs a state store" in result.stderr
    assert all(word in result.stderr for word in NEEDS)
    assert "guest:guest" not in result.stderr
    assert "Traceback" not in result.stderr


async def test_the_lambda_handler_refuses_an_idempotent_task_without_a_store() -> None:
    from aioworkers import lambda_handler

    app = App(sqs_url(moto_endpoint()), queue=f"store-{uuid.uuid4().hex[:12]}")
    runs: list[str] = []
    _idempotent(app, runs)
    record = {
        "messageId": "m-1",
        "body": '{"v":1,"id":"j1","task":"charge","args":["x"],"kwargs":{},"attempt":1,'
        '"enqueued_at":1700000000000,"headers":{}}',
        "attributes": {"ApproximateReceiveCount": "1"},
        "eventSourceARN": f"arn:aws:sqs:us-east-1:000000000000:{app.queue}",
    }
    try:
        with pytest.raises(ConfigError) as info:
            await lambda_handler(app).handle({"Records": [record]})
        assert all(word in str(info.value) for word in NEEDS)
        assert runs == []
    finally:
        await app.aclose()
