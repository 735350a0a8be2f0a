"""Redis-specific behaviour beyond the conformance suite, on the real server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from aioworkers import LeaseLost, QueueDepth
from aioworkers.brokers import redis as redis_broker
from aioworkers.brokers.redis import RedisBroker

from ..services import REDIS, ensure
from .conftest import REDIS_URL, delete_prefix


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    ensure(REDIS)
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    await delete_prefix(name)


@pytest.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    ensure(REDIS)
    c = aioredis.from_url(REDIS_URL)
    yield c
    await c.aclose()


def make(prefix: str, consumer: str, visibility: float = 30.0) -> RedisBroker:
    return RedisBroker(
        f"{REDIS_URL}?prefix={prefix}", visibility_timeout=visibility, consumer=consumer
    )


async def test_every_key_of_a_queue_shares_one_cluster_slot(prefix: str) -> None:
    broker = make(prefix, "c1")
    keys = broker.keys("emails")
    names = [keys.stream, keys.delayed, keys.payloads, keys.dead]
    assert {k.split("}")[0] + "}" for k in names} == {f"{prefix}:{{emails}}"}
    await broker.aclose()


async def test_entries_not_written_by_aioworkers_are_handed_on_for_dead_lettering(
    prefix: str, client: aioredis.Redis
) -> None:
    broker = make(prefix, "c1")
    await client.xadd(broker.keys("q").stream, {"data": "hand-written"})
    (got,) = await broker.fetch("q", max_messages=10, wait=0.5)
    assert b"hand-written" in got.body  # the decode pipeline then dead-letters it
    await broker.ack([got])
    await broker.aclose()


async def test_a_lost_group_is_recreated_and_old_deliveries_settle_nothing(
    prefix: str, client: aioredis.Redis
) -> None:
    broker = make(prefix, "c1")
    await broker.publish("q", [b"before"])
    (old,) = await broker.fetch("q", max_messages=1, wait=0.5)
    # What a server restarted without persistence looks like: everything is gone.
    await client.delete(broker.keys("q").stream)
    assert await broker.fetch("q", max_messages=1, wait=0) == []
    await broker.ack([old])  # no error, nothing acked
    assert await broker.extend([old], visibility=30) == [old]
    with pytest.raises(LeaseLost):
        await broker.retry(old, body=b"again", delay=0)
    await broker.publish("q", [b"after"])
    (new,) = await broker.fetch("q", max_messages=1, wait=0.5)
    assert new.body == b"after"
    await broker.ack([new])
    assert await broker.depth("q") == QueueDepth()
    await broker.aclose()


async def test_idle_consumers_of_dead_workers_are_pruned_but_busy_ones_kept(
    prefix: str, client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_broker, "PRUNE_IDLE", 0.0)
    dead = make(prefix, "dead-idle", visibility=0.2)
    busy = make(prefix, "busy", visibility=0.2)
    live = make(prefix, "live", visibility=0.2)
    await dead.publish("q", [b"a", b"b"])
    (a,) = await dead.fetch("q", max_messages=1, wait=0.5)
    await dead.ack([a])
    (b,) = await busy.fetch("q", max_messages=1, wait=0.5)
    await asyncio.sleep(2.2)  # every consumer idle longer than 10 x visibility
    assert await busy.extend([b], visibility=0.2) == []  # b stays busy's, not reclaimable
    assert await live.fetch("q", max_messages=1, wait=0) == []  # reclaim finds nothing, sweeps
    stream = live.keys("q").stream
    names = {c["name"].decode() for c in await client.xinfo_consumers(stream, "workers")}
    assert "dead-idle" not in names
    assert "busy" in names  # it holds an entry: only a reclaim may take it
    await busy.ack([b])
    for broker in (dead, busy, live):
        await broker.aclose()


async def test_aclose_removes_its_consumer_only_when_it_holds_nothing(
    prefix: str, client: aioredis.Redis
) -> None:
    idle = make(prefix, "idle")
    holding = make(prefix, "holding")
    await idle.publish("q", [b"x"])
    (x,) = await idle.fetch("q", max_messages=1, wait=0.5)
    await idle.ack([x])
    stream = idle.keys("q").stream
    names = {c["name"].decode() for c in await client.xinfo_consumers(stream, "workers")}
    assert "idle" in names
    await idle.aclose()
    await holding.publish("q", [b"y"])
    (held,) = await holding.fetch("q", max_messages=1, wait=0.5)
    assert held.body == b"y"
    await holding.aclose()
    names = {c["name"].decode() for c in await client.xinfo_consumers(stream, "workers")}
    assert names == {"holding"}  # its pending entry keeps it, for others to reclaim
