"""What ``run --metrics-port`` / ``--otlp`` set up: SDK providers, the Prometheus reader
and the OTLP exporters, imported lazily when a flag asks for them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..telemetry.config import real_meter_provider, real_tracer_provider
from .health import Health, serve

if TYPE_CHECKING:
    from ..app import App
    from ..worker import Worker
    from .http_endpoint import MetricsEndpoint

log = logging.getLogger("aioworkers")


def _sdk(flag: str) -> Any:
    try:
        from opentelemetry.sdk import metrics as sdk_metrics
    except ImportError:
        raise ConfigError(
            f"{flag} needs the OpenTelemetry SDK: pip install 'aio-job-workers[otel]'"
        ) from None
    return sdk_metrics


def _resource() -> Any:
    from opentelemetry.sdk.resources import Resource

    named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    return Resource.create({} if named else {"service.name": "aioworkers"})


def otlp_exporters() -> tuple[Any, Any]:
    """The OTLP span and metric exporters for ``OTEL_EXPORTER_OTLP_PROTOCOL`` (default
    ``http/protobuf``; ``grpc``); endpoint, headers etc. come from the usual OTEL_* vars."""
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf").strip()
    if protocol not in ("http/protobuf", "grpc"):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use http/protobuf or grpc")
    package = "grpc" if protocol == "grpc" else "http"
    module = f"opentelemetry.exporter.otlp.proto.{package}"
    try:
        spans = importlib.import_module(f"{module}.trace_exporter")
        points = importlib.import_module(f"{module}.metric_exporter")
    except ImportError:
        raise ConfigError(
            f"--otlp ({protocol}) needs the exporter: "
            f"pip install opentelemetry-exporter-otlp-proto-{package}"
        ) from None
    return spans.OTLPSpanExporter(), points.OTLPMetricExporter()


class Exporters:
    """What ``aioworkers run --metrics-port/--otlp`` sets up: SDK providers made global
    (before the worker is built: it checks for a provider once), the HTTP endpoint in a
    thread of its own (it answers even while the event loop is stuck, and says so), and
    the health checks on the loop."""

    def __init__(self) -> None:
        self.meter_provider: Any = None
        self.tracer_provider: Any = None
        self.health: Health | None = None
        self._server: MetricsEndpoint | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Exporters:
        self = cls()
        port: int | None = getattr(args, "metrics_port", None)
        otlp: bool = getattr(args, "otlp", False)
        if port is None and not otlp:
            return self
        sdk_metrics = _sdk("--metrics-port" if port is not None else "--otlp")
        readers: list[Any] = []
        if port is not None:
            try:
                from opentelemetry.exporter.prometheus import PrometheusMetricReader
            except ImportError:
                raise ConfigError(
                    "--metrics-port needs the Prometheus exporter: "
                    "pip install 'aio-job-workers[otel]'"
                ) from None
            readers.append(PrometheusMetricReader())
        if otlp:
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            span_exporter, metric_exporter = otlp_exporters()
            readers.append(PeriodicExportingMetricReader(metric_exporter))
            self.tracer_provider = TracerProvider(resource=_resource())
            self.tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        self.meter_provider = sdk_metrics.MeterProvider(
            metric_readers=readers, resource=_resource()
        )
        _set_global(self.meter_provider, self.tracer_provider)
        if port is not None:
            self.health = Health()
            self._server = serve(args.metrics_host, port, self.health)
        return self

    def watch(self, app: App, worker: Worker) -> None:
        """Start the health checks of ``worker`` (on the running loop)."""
        if self.health is not None:
            self._task = asyncio.get_running_loop().create_task(self.health.run(app, worker))

    def close(self) -> None:
        """Stop the endpoint and flush the exporters."""
        if self._task is not None:
            self._task.cancel()
        if self._server is not None:
            self._server.close()
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                with contextlib.suppress(Exception):
                    provider.shutdown()


def _set_global(meter_provider: Any, tracer_provider: Any) -> None:
    from opentelemetry import metrics, trace

    if real_meter_provider(None) is not None:
        log.warning("the app set a MeterProvider already: --metrics-port/--otlp metrics are off")
    else:
        metrics.set_meter_provider(meter_provider)
    if tracer_provider is not None:
        if real_tracer_provider(None) is not None:
            log.warning("the app set a TracerProvider already: --otlp traces are off")
        else:
            trace.set_tracer_provider(tracer_provider)
