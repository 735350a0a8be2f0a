"""OpenTelemetry SDK providers with in-memory readers, and a Redis app per test.

The providers are passed to the app (`app.telemetry`), not set globally: a process can
set the global ones only once, and the rest of the suite runs without any.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import aioworkers
from aioworkers.telemetry import Telemetry

from ..services import REDIS, REDIS_URL, delete_prefix, ensure


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
