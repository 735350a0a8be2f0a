"""OpenTelemetry SDK providers with in-memory readers, and a broker per test.

The providers are passed to the app (`app.telemetry`), not set globally: a process can
set the global ones only once, and the rest of the suite runs without any.

`backend` runs a test once per broker that has landed (memory, Redis, RabbitMQ, SQS on
the session's moto server); its apps use queues of the test's own, deleted afterwards.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import aioworkers
from aioworkers.telemetry import Telemetry

from ..services import (
    AMQP_URL,
    RABBITMQ,
    REDIS,
    REDIS_URL,
    delete_amqp_queues,
    delete_prefix,
    ensure,
    moto_endpoint,
    sqs_url,
)


@dataclass
class Otel:
    reader: InMemoryMetricReader
    spans: InMemorySpanExporter
    meter_provider: MeterProvider
    tracer_provider: TracerProvider

    def telemetry(self, depth_interval: float = 0.05) -> Telemetry:
        return Telemetry(
            meter_provider=self.meter_provider,
            tracer_provider=self.tracer_provider,
            depth_interval=depth_interval,
        )

    def points(self, name: str) -> list[Any]:
        """Every data point of instrument ``name`` collected now."""
        data = self.reader.get_metrics_data()
        found = []
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())


@pytest.fixture
def otel() -> Otel:
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    return Otel(reader, spans, MeterProvider(metric_readers=[reader]), tracer_provider)


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A Redis broker URL whose keys live under a prefix of this test's own."""
    ensure(REDIS)
    prefix = f"aiowtel-{uuid.uuid4().hex[:12]}"
    try:
        yield f"{REDIS_URL}?prefix={prefix}"
    finally:
        await delete_prefix(prefix)


def make_app(url: str) -> aioworkers.App:
    return aioworkers.App(url, queue=f"tel-{uuid.uuid4().hex[:8]}", visibility_timeout=5.0)


# -- every broker ----------------------------------------------------------------------------


@dataclass
class Backend:
    """One broker under test: its URL, its ``messaging.system`` and timings.

    ``visibility``: the apps' visibility timeout (SQS counts whole seconds). ``within``:
    how long a test may wait for a small workload to settle (moto handles about 50
    messages a second). Every queue a test names comes from `queue` (or `app`), so the
    fixture knows what to delete.
    """

    name: str
    url: str
    system: str
    visibility: float
    within: float
    queues: set[str] = field(default_factory=set)
    apps: list[tuple[aioworkers.App, bool]] = field(default_factory=list)

    def queue(self) -> str:
        name = f"tel-{uuid.uuid4().hex[:12]}"
        self.queues.add(name)
        return name

    def app(self) -> aioworkers.App:
        app = aioworkers.App(self.url, queue=self.queue(), visibility_timeout=self.visibility)
        return self.track(app)

    def track(self, app: aioworkers.App, *, close: bool = True) -> aioworkers.App:
        """Delete the queues ``app``'s broker declared after the test, and close ``app``
        then unless ``close`` is false (an app the test runs and closes in loops of its
        own: its connections belong to those)."""
        self.apps.append((app, close))
        return app


BACKENDS = ("memory", "redis", "amqp", "sqs", "sqlite")


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    name = request.param
    prefix = f"aiowtel-{uuid.uuid4().hex[:12]}"
    if name == "memory":
        b = Backend(name, "memory://", "memory", visibility=5.0, within=10.0)
    elif name == "redis":
        ensure(REDIS)
        b = Backend(name, f"{REDIS_URL}?prefix={prefix}", "redis", visibility=5.0, within=10.0)
    elif name == "amqp":
        ensure(RABBITMQ)
        b = Backend(name, AMQP_URL, "rabbitmq", visibility=5.0, within=10.0)
    elif name == "sqlite":
        b = Backend(name, f"sqlite:///{tmp_path}/jobs.db", "sqlite", visibility=5.0, within=10.0)
    else:
        endpoint = moto_endpoint()
        url = sqs_url(endpoint, prefix=f"{prefix}-")
        b = Backend(name, url, "aws_sqs", visibility=5.0, within=20.0)
    try:
        yield b
    finally:
        for app, close in b.apps:
            if close:
                with contextlib.suppress(Exception):
                    await app.aclose()
        if name == "redis":
            await delete_prefix(prefix)
        elif name == "amqp":
            await delete_amqp_queues(amqp_queues(b))
        elif name == "sqs":
            await delete_sqs_queues(endpoint, f"{prefix}-")


def amqp_queues(b: Backend) -> set[str]:
    """The test's queues with their DLQs, and every queue its apps' brokers declared
    (delay queues included)."""
    from aioworkers.brokers.amqp import AmqpBroker

    names = {n for q in b.queues for n in (q, f"{q}.dead")}
    for app, _ in b.apps:
        broker = app._broker
        if isinstance(broker, AmqpBroker):
            names |= broker.known_queues
    return names


async def delete_sqs_queues(endpoint: str, prefix: str) -> None:
    """Delete every SQS queue whose name starts with ``prefix`` (queues and DLQs)."""
    from aiobotocore.session import get_session  # type: ignore[import-untyped]

    session = get_session()
    async with session.create_client("sqs", region_name="us-east-1", endpoint_url=endpoint) as c:
        reply = await c.list_queues(QueueNamePrefix=prefix)
        for url in reply.get("QueueUrls") or []:
            await c.delete_queue(QueueUrl=url)
