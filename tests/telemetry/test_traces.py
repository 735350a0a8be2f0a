"""Trace continuity from the producer to the consumer across every broker: the producer
span's context travels in the envelope headers; one consumer span per attempt."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import orjson
from opentelemetry.propagate import inject
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import SpanKind, StatusCode

import aioworkers
from aioworkers.idempotency import MemoryStore
from aioworkers.telemetry import Telemetry

from .conftest import Backend, Otel, make_app


async def test_consumer_spans_continue_the_producer_trace(otel: Otel, backend: Backend) -> None:
    app = backend.app()
    app.telemetry = otel.telemetry()
    tracer = otel.tracer_provider.get_tracer("test")
    seen: list[str] = []

    @app.task(retries=1, backoff=0)
    async def flaky(n: int) -> None:
        job = aioworkers.current_job()
        seen.append(job.headers["traceparent"])
        with tracer.start_as_current_span("inside the handler"):
            if job.attempt == 1:
                raise RuntimeError("first attempt fails")

    with tracer.start_as_current_span("web request") as request:
        job_id = await flaky.enqueue(1)
    async with app:
        await app.worker(poll=0.1).run(burst=True)

    spans = otel.finished()
    (producer,) = (s for s in spans if s.kind is SpanKind.PRODUCER)
    consumers = sorted(
        (s for s in spans if s.kind is SpanKind.CONSUMER),
        key=lambda s: s.attributes["aioworkers.job.attempt"],
    )
    assert producer.name == f"send {app.queue}"
    assert producer.attributes["messaging.system"] == backend.system
    assert producer.parent is not None
    assert producer.parent.span_id == request.get_span_context().span_id
    assert producer.attributes["messaging.message.id"] == job_id
    # The W3C header the handler saw names the producer span, on both attempts.
    assert len(seen) == 2
    assert seen[0] == seen[1]
    assert seen[0].split("-")[2] == f"{producer.context.span_id:016x}"

    assert [c.attributes["aioworkers.job.attempt"] for c in consumers] == [1, 2]
    for consumer in consumers:
        assert consumer.name == f"process {app.queue}"
        assert consumer.context.trace_id == producer.context.trace_id
        assert consumer.parent is not None
        assert consumer.parent.span_id == producer.context.span_id
        assert consumer.attributes["messaging.system"] == backend.system
        assert consumer.attributes["messaging.destination.name"] == app.queue
        assert consumer.attributes["messaging.operation.name"] == "process"
        assert consumer.attributes["messaging.message.id"] == job_id
        assert consumer.attributes["aioworkers.task.name"] == "flaky"
    first, second = consumers
    assert first.attributes["aioworkers.job.outcome"] == "retried"
    assert first.status.status_code is StatusCode.ERROR
    (event,) = first.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "RuntimeError"
    assert second.attributes["aioworkers.job.outcome"] == "ok"
    assert second.status.status_code is StatusCode.UNSET
    assert not second.events

    # The handler's own spans are children of the consumer span of their attempt.
    inner = [s for s in spans if s.name == "inside the handler"]
    assert sorted(s.parent.span_id for s in inner if s.parent) == sorted(
        c.context.span_id for c in consumers
    )


async def test_dead_letter_and_undecodable_bodies_get_spans(otel: Otel, backend: Backend) -> None:
    app = backend.app()
    app.telemetry = otel.telemetry()

    @app.task(retries=0)
    async def broken() -> None:
        raise ValueError("no")

    await broken.enqueue()
    await app.broker.publish(app.queue, [b"\xff not json"])
    async with app:
        await app.worker(poll=0.1).run(burst=True)
        await asyncio.sleep(0)
    consumers = [s for s in otel.finished() if s.kind is SpanKind.CONSUMER]
    outcomes = sorted(s.attributes["aioworkers.job.outcome"] for s in consumers)
    assert outcomes == ["dead", "dead"]
    garbage = next(s for s in consumers if "aioworkers.task.name" not in s.attributes)
    assert garbage.parent is None  # no headers to continue: a new trace
    dead = next(s for s in consumers if s.attributes.get("aioworkers.task.name") == "broken")
    assert dead.events[0].attributes["exception.type"] == "ValueError"


async def test_a_body_that_fails_the_schema_keeps_its_trace(otel: Otel, redis_url: str) -> None:
    app = make_app(redis_url)
    app.telemetry = otel.telemetry()
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("request") as request:
        headers: dict[str, str] = {}
        inject(headers)
    # An envelope from a newer producer: valid JSON, a version this worker can't read.
    body = orjson.dumps({"v": 2, "id": "x1", "task": "t", "headers": headers})
    await app.broker.publish(app.queue, [body])
    async with app:
        await app.worker(poll=0.1).run(burst=True)
    (consumer,) = [s for s in otel.finished() if s.kind is SpanKind.CONSUMER]
    assert consumer.attributes["aioworkers.job.outcome"] == "dead"
    assert consumer.parent is not None
    assert consumer.parent.span_id == request.get_span_context().span_id
    assert consumer.context.trace_id == request.get_span_context().trace_id


async def test_no_headers_without_a_tracer(otel: Otel, redis_url: str) -> None:
    app = make_app(redis_url)
    # Metrics only: and there is no global tracer provider in the test process.
    app.telemetry = Telemetry(meter_provider=otel.meter_provider)
    seen: list[dict[str, str]] = []

    @app.task
    async def look() -> None:
        seen.append(aioworkers.current_job().headers)

    await look.enqueue()
    async with app:
        await app.worker(poll=0.1).run(burst=True)
    assert seen == [{}]
    assert otel.finished() == []


class Ended(SpanProcessor):
    """An event per job outcome, set when a span with that outcome ends."""

    def __init__(self) -> None:
        self.outcomes: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    def on_end(self, span: ReadableSpan) -> None:
        outcome = (span.attributes or {}).get("aioworkers.job.outcome")
        if outcome is not None:
            self.outcomes[str(outcome)].set()


async def test_deferred_and_duplicate_jobs_are_not_errors(otel: Otel) -> None:
    # Short: a deferred job comes back after about a third of it.
    app = aioworkers.App("memory://", visibility_timeout=0.3, idempotency=MemoryStore())
    app.telemetry = otel.telemetry()
    ended = Ended()
    otel.tracer_provider.add_span_processor(ended)
    started = asyncio.Event()
    gate = asyncio.Event()
    runs: list[str] = []

    @app.task(idempotent=True, retries=0)
    async def pay(who: str) -> None:
        runs.append(who)
        if who == "first":
            started.set()
            await gate.wait()

    await pay.options(key="invoice-7").enqueue("first")
    async with app, app.worker(poll=0.05), asyncio.timeout(10):
        await started.wait()
        await pay.options(key="invoice-7").enqueue("second")
        # The key is busy: the second job waits for it (deferred), then finds it done.
        await ended.outcomes["deferred"].wait()
        gate.set()
        await ended.outcomes["duplicate"].wait()

    assert runs == ["first"]
    consumers = [s for s in otel.finished() if s.kind is SpanKind.CONSUMER]
    by_outcome: dict[str, list[ReadableSpan]] = defaultdict(list)
    for span in consumers:
        by_outcome[str(span.attributes["aioworkers.job.outcome"])].append(span)
    assert sorted(by_outcome) == ["deferred", "duplicate", "ok"]
    assert len(by_outcome["ok"]) == len(by_outcome["duplicate"]) == 1
    for span in consumers:
        # A decision of a healthy worker: no error status, no exception event.
        assert span.status.status_code is StatusCode.UNSET, span.attributes
        assert not span.events, span.attributes
