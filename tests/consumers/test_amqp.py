"""Consumers on a real RabbitMQ: a topic exchange fed by a plain aio-pika producer."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import orjson
import pytest

import aioworkers
from aioworkers import ConfigError, Message

from ..services import AMQP_URL, RABBITMQ, ensure
from ._wait import until

POLL = 0.1


@pytest.fixture
async def names() -> AsyncIterator[tuple[str, str]]:
    """A queue and an exchange of the test's own, deleted afterwards."""
    ensure(RABBITMQ)
    tag = uuid.uuid4().hex[:8]
    queue, exchange = f"test-consumer-{tag}", f"test-events-{tag}"
    yield queue, exchange
    conn = await aio_pika.connect(AMQP_URL)
    async with conn:
        ch = await conn.channel()
        for name in (queue, f"{queue}.dead"):
            await ch.queue_delete(name)
        await ch.exchange_delete(exchange)


async def _produce(exchange: str, messages: list[tuple[str, bytes, dict[str, Any]]]) -> None:
    conn = await aio_pika.connect(AMQP_URL)
    async with conn:
        ch = await conn.channel()
        ex = await ch.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        for key, body, headers in messages:
            await ex.publish(aio_pika.Message(body, headers=headers), routing_key=key)


def _app() -> aioworkers.App:
    return aioworkers.App(AMQP_URL, backoff=0.01, max_backoff=0.01)


async def test_topic_binding_gets_exactly_the_matching_keys(names: tuple[str, str]) -> None:
    queue, exchange = names
    app = _app()
    got: list[tuple[str | None, Any, dict[str, Any]]] = []

    @app.consumer(queue, exchange=exchange, routing_key="order.*")
    async def on_order(body: dict[str, Any], message: Message) -> None:
        got.append((message.routing_key, body, dict(message.headers)))

    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with app.worker(poll=POLL):
        await _produce(
            exchange,
            [
                ("order.created", b'{"id": 1}', {"traceparent": trace}),
                ("user.created", b'{"id": 2}', {}),
                ("order.paid", b'{"id": 3}', {}),
                ("order.paid.late", b'{"id": 4}', {}),  # * is one word
                ("order.done", b'{"id": 5}', {}),  # the last one: the rest came before it
            ],
        )
        await until(lambda: any(key == "order.done" for key, _, _ in got))
    await app.aclose()
    assert sorted((key, body["id"]) for key, body, _ in got) == [
        ("order.created", 1),
        ("order.done", 5),
        ("order.paid", 3),
    ]
    assert next(h for key, _, h in got if key == "order.created")["traceparent"] == trace

    # A second start binds again without complaint; another type for the exchange is refused.
    again = _app()
    again.consumer(queue, exchange=exchange, routing_key="order.*")(on_order)
    async with again.worker(poll=POLL):
        pass
    await again.aclose()
    other = _app()
    other.consumer(queue, exchange=exchange, exchange_type="direct")(on_order)
    with pytest.raises(ConfigError, match="already exists"):
        async with other.worker(poll=POLL):
            pass
    await other.aclose()


async def test_retried_with_its_body_then_dead_lettered_then_replayed(
    names: tuple[str, str],
) -> None:
    queue, exchange = names
    app = _app()
    seen: list[tuple[bytes, int, str | None]] = []
    fail = True

    @app.consumer(queue, exchange=exchange, routing_key="order.#", retries=2)
    async def on_order(body: dict[str, Any], message: Message) -> None:
        seen.append((message.body, message.attempt, message.routing_key))
        if fail:
            raise RuntimeError("downstream is down")

    body = orjson.dumps({"order": 42, "note": "ünïcode"})
    async with app.worker(poll=POLL):
        await _produce(exchange, [("order.created", body, {})])
        await until(lambda: len(seen) == 3)
        dlq = app.dlq(queue)

        async def dead() -> bool:
            return len(await dlq.list()) == 1

        await until(dead)
        (letter,) = await dlq.list()
        assert (letter.reason, letter.body, letter.attempts) == ("max_retries", body, 3)
        assert seen == [(body, n, "order.created") for n in (1, 2, 3)]
        fail = False
        assert await dlq.replay() == 1
        await until(lambda: len(seen) == 4)
    await app.aclose()
    assert seen[3][:2] == (body, 1)


async def test_garbage_is_dead_lettered_at_once(names: tuple[str, str]) -> None:
    queue, exchange = names
    app = _app()
    calls: list[Any] = []

    @app.consumer(queue, exchange=exchange, routing_key="#")
    async def on_message(body: Any) -> None:
        calls.append(body)

    async with app.worker(poll=POLL):
        await _produce(exchange, [("x", b"\xff not json", {})])

        async def dead() -> bool:
            return len(await app.dlq(queue).list()) == 1

        await until(dead)
        (letter,) = await app.dlq(queue).list()
    await app.aclose()
    assert calls == []
    assert (letter.reason, letter.body, letter.attempts) == ("decode_error", b"\xff not json", 1)


async def test_app_publish_with_confirms(names: tuple[str, str]) -> None:
    queue, exchange = names
    app = _app()
    got: list[tuple[str, Message]] = []

    @app.consumer(queue, decode="text", exchange=exchange, routing_key="greet.#")
    async def on_text(body: str, message: Message) -> None:
        got.append((body, message))

    async with app.worker(poll=POLL):
        await app.publish(exchange, "greet.world", "hello", headers={"x-source": "test"})
        await until(lambda: bool(got))
    await app.aclose()
    body, message = got[0]
    assert (body, message.routing_key, message.headers["x-source"]) == (
        "hello",
        "greet.world",
        "test",
    )


async def test_a_producers_traceparent_is_the_spans_parent(names: tuple[str, str]) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from aioworkers.telemetry import Telemetry

    queue, exchange = names
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    app = _app()
    app.telemetry = Telemetry(tracer_provider=provider)
    got: list[Any] = []

    @app.consumer(queue, exchange=exchange, routing_key="#")
    async def on_message(body: Any) -> None:
        got.append(body)

    trace_id, span_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    async with app.worker(poll=POLL):
        await _produce(exchange, [("a", b"1", {"traceparent": f"00-{trace_id}-{span_id}-01"})])
        await until(lambda: bool(spans.get_finished_spans()))
    await app.aclose()
    (span,) = spans.get_finished_spans()
    assert span.parent is not None
    assert (span.parent.trace_id, span.parent.span_id) == (int(trace_id, 16), int(span_id, 16))
