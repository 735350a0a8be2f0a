"""A retried foreign entry on Redis keeps the fields its producer XADDed and carries the
attempt in one more stream field (``aioworkers-attempt``), on real Redis, through the
runtime's own retry (`foreign.retry_body`): at once and after a backoff delay."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from aioworkers._runtime.foreign import retry_body
from aioworkers.brokers.base import ATTEMPT_HEADER, Delivery, RawRetry
from aioworkers.brokers.redis import RedisBroker

from ..services import REDIS, REDIS_URL, delete_prefix, ensure


class Stream:
    def __init__(self) -> None:
        self.prefix = f"t-rawretry-{uuid.uuid4().hex[:8]}"
        self.key = f"{self.prefix}:{{clicks}}:stream"
        self.broker = RedisBroker(f"{REDIS_URL}?prefix={self.prefix}", visibility_timeout=30)
        self.redis: Any = aioredis.Redis.from_url(REDIS_URL)

    async def one(self, wait: float = 0.0) -> Delivery:
        """The one entry to read; with ``wait``, fetches until a delayed one is promoted
        (a fetch that blocks until the eta returns empty: the next one promotes it)."""
        for _ in range(20):
            got = await self.broker.fetch("clicks", max_messages=10, wait=wait)
            if got or not wait:
                (one,) = got
                return one
        raise AssertionError("the delayed entry never came back")

    async def fields(self) -> list[dict[bytes, bytes]]:
        """What another reader of the stream sees: every entry's fields."""
        return [fields for _, fields in await self.redis.xrange(self.key)]


@pytest.fixture
async def stream() -> AsyncIterator[Stream]:
    ensure(REDIS)
    s = Stream()
    try:
        yield s
    finally:
        await s.broker.aclose()
        await s.redis.aclose()
        await delete_prefix(s.prefix)


async def test_a_retried_xadded_entry_keeps_its_fields_and_carries_the_attempt(
    stream: Stream,
) -> None:
    assert isinstance(stream.broker, RawRetry)
    await stream.broker.fetch("clicks", max_messages=1, wait=0)  # the group, from the start
    await stream.redis.xadd(stream.key, {"user": "9", "page": "/home"})
    first = await stream.one()
    assert orjson.loads(first.body) == {"user": "9", "page": "/home"}
    assert stream.broker.message_meta(first) == (None, {})  # attempt 1: no field yet

    await retry_body(stream.broker, first, 2, 0.0)
    assert await stream.fields() == [
        {b"user": b"9", b"page": b"/home", ATTEMPT_HEADER.encode(): b"2"}
    ]
    second = await stream.one()
    # The consumer sees the producer's fields only; the attempt comes from the metadata.
    assert orjson.loads(second.body) == {"user": "9", "page": "/home"}
    assert stream.broker.message_meta(second) == (None, {ATTEMPT_HEADER: "2"})

    # After a backoff the fields wait in the delayed set, then come back as they were.
    await retry_body(stream.broker, second, 3, 0.05)
    assert await stream.fields() == []
    third = await stream.one(wait=0.5)
    assert await stream.fields() == [
        {b"user": b"9", b"page": b"/home", ATTEMPT_HEADER.encode(): b"3"}
    ]
    assert orjson.loads(third.body) == {"user": "9", "page": "/home"}
    assert stream.broker.message_meta(third) == (None, {ATTEMPT_HEADER: "3"})


async def test_an_entry_with_a_body_field_keeps_it_unchanged(stream: Stream) -> None:
    await stream.broker.fetch("clicks", max_messages=1, wait=0)
    body = b"\x00\xffnot json"
    await stream.redis.xadd(stream.key, {"b": body, "source": "billing"})
    first = await stream.one()
    assert first.body == body
    await retry_body(stream.broker, first, 2, 0.05)
    again = await stream.one(wait=0.5)
    assert again.body == body
    assert await stream.fields() == [
        {b"b": body, b"source": b"billing", ATTEMPT_HEADER.encode(): b"2"}
    ]


async def test_an_entry_trimmed_while_pending_is_retried_from_its_body(stream: Stream) -> None:
    await stream.broker.fetch("clicks", max_messages=1, wait=0)
    entry_id = await stream.redis.xadd(stream.key, {"user": "1"})
    first = await stream.one()
    await stream.redis.xdel(stream.key, entry_id)  # the producer's XADD MAXLEN trimmed it
    await retry_body(stream.broker, first, 2, 0.0)
    again = await stream.one()
    assert orjson.loads(again.body) == {"user": "1"}
    assert stream.broker.message_meta(again) == (None, {ATTEMPT_HEADER: "2"})
