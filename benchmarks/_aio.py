"""The aioworkers side: the same handlers registered as tasks, run by a `Worker`.

python benchmarks/_aio.py '<spec json>'    (started by run.py)
"""

from __future__ import annotations

import asyncio
import logging

from _child import Spec, Work, main

import aioworkers
from aioworkers.telemetry import Telemetry

RETRY_BACKOFF = 0.001  # seconds


def configure_otel(which: str) -> None:
    """SDK meter and tracer providers, as a user's process would have them: every span
    sampled and handed to a batch processor (whose exporter drops them), metrics
    aggregated in memory. ``off`` sets none (the app's telemetry is disabled instead)."""
    if which == "off":
        return
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    class Discard(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    if which in ("all", "metrics", "sampled"):
        metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    if which == "sampled":
        # What production tracing usually runs: 1 trace in 10 kept, unless the producer
        # already decided (the parent's sampled flag wins).
        tracer_provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)))
        tracer_provider.add_span_processor(BatchSpanProcessor(Discard()))
        trace.set_tracer_provider(tracer_provider)
    if which in ("all", "traces"):
        tracer_provider = TracerProvider(sampler=ALWAYS_ON)
        tracer_provider.add_span_processor(BatchSpanProcessor(Discard()))
        trace.set_tracer_provider(tracer_provider)


class AioWorker:
    def __init__(self, spec: Spec, work: Work) -> None:
        if spec.otel:
            configure_otel(spec.otel)
        self.app = aioworkers.App(spec.broker_url, queue=spec.queue, concurrency=spec.concurrency)
        if spec.otel == "off":
            # aioworkers' own instrumentation off, whatever providers the process has.
            self.app.telemetry = Telemetry(enabled=False)
        for name, handler in work.handlers.items():
            # W5: its retry due at once (about 1 ms), as the raw loop has no delay to match.
            self.app.task(name, backoff=RETRY_BACKOFF if name == "w5" else None)(handler)
        if spec.workload == "W5":
            # The retry path, not a warning line per job on stderr (the child's only handler).
            logging.getLogger("aioworkers").setLevel(logging.ERROR)
        queues = spec.queue_names() if spec.queues > 1 else None
        self.worker = self.app.worker(concurrency=spec.concurrency, queues=queues)
        self.running: asyncio.Task[None] | None = None

    async def start(self) -> asyncio.Task[None]:
        self.running = asyncio.create_task(self.worker.run())
        return self.running

    async def stop(self) -> None:
        self.worker.stop()
        if self.running is not None and not self.running.done():
            await self.running
        await self.app.aclose()


if __name__ == "__main__":
    main(AioWorker)
