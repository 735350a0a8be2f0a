"""Where an app's telemetry goes: `Telemetry` (explicit or global providers), whether a
real (SDK) provider is configured at all, and the ``messaging.system`` of a broker."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics, trace

from ..brokers.base import Delivery, MessagingSystem
from .conventions import SCOPE
from .metrics import Metrics
from .producer import Producer
from .worker import WorkerTelemetry

DEFAULT_DEPTH_INTERVAL = 15.0


def messaging_system(broker: object) -> str:
    """``messaging.system`` of ``broker``: what it says (`MessagingSystem`), else, for a
    third-party broker without it, its class name lower-cased without ``broker``."""
    if isinstance(broker, MessagingSystem):
        return broker.messaging_system
    return type(broker).__name__.lower().removesuffix("broker") or "custom"


def real_meter_provider(provider: metrics.MeterProvider | None) -> metrics.MeterProvider | None:
    """``provider`` (default: the global one) unless it is one of the API's own, which
    record nothing (the proxy before one is set, the no-op)."""
    provider = provider or metrics.get_meter_provider()
    if isinstance(provider, metrics.NoOpMeterProvider) or type(provider).__name__ in (
        "_ProxyMeterProvider",
        "NoOpMeterProvider",
    ):
        return None
    return provider


def real_tracer_provider(provider: trace.TracerProvider | None) -> trace.TracerProvider | None:
    """``provider`` (default: the global one) unless it is one of the API's own."""
    provider = provider or trace.get_tracer_provider()
    if isinstance(provider, trace.NoOpTracerProvider | trace.ProxyTracerProvider):
        return None
    return provider


class Telemetry:
    """Where an `App` sends metrics and traces: explicit providers, or the global ones
    (``opentelemetry.metrics.set_meter_provider`` / ``trace.set_tracer_provider``).

    ``app.telemetry = Telemetry(meter_provider=mp, tracer_provider=tp)`` before building
    workers uses other providers than the global ones (tests, several pipelines).
    ``depth_interval`` is how often a worker polls `Broker.depth` for the queue gauges.
    ``enabled=False`` turns aioworkers' own instrumentation off whatever providers the
    process has (the spans a handler starts are still recorded).
    """

    def __init__(
        self,
        *,
        meter_provider: metrics.MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        depth_interval: float = DEFAULT_DEPTH_INTERVAL,
        enabled: bool = True,
    ) -> None:
        self._meter_provider = meter_provider
        self._tracer_provider = tracer_provider
        self.depth_interval = depth_interval
        self.enabled = enabled

    def __repr__(self) -> str:
        on = [n for n, v in (("metrics", self.metrics()), ("traces", self.tracer())) if v]
        return f"<Telemetry {'+'.join(on) or 'off'}>"

    def metrics(self) -> Metrics | None:
        """The instruments, or None when no real MeterProvider is configured."""
        if not self.enabled:
            return None
        provider = real_meter_provider(self._meter_provider)
        return None if provider is None else Metrics.of(provider)

    def tracer(self) -> trace.Tracer | None:
        """The tracer, or None when no real TracerProvider is configured."""
        if not self.enabled:
            return None
        provider = real_tracer_provider(self._tracer_provider)
        return None if provider is None else provider.get_tracer(SCOPE)

    def producer(self, system: str | Callable[[], str]) -> Producer | None:
        """What `App.enqueue_many` reports to, for one batch; None when all is off.
        ``system`` is the ``messaging.system``, or what returns it (called only if on)."""
        meters, tracer = self.metrics(), self.tracer()
        if meters is None and tracer is None:
            return None
        return Producer(system if isinstance(system, str) else system(), meters, tracer)

    def for_worker(
        self, system: str, held: Callable[[], Iterable[Delivery]]
    ) -> WorkerTelemetry | None:
        """What one worker reports to; None when all is off (checked once, here).
        ``held`` returns the deliveries the worker holds now (for the in-flight gauge)."""
        meters, tracer = self.metrics(), self.tracer()
        if meters is None and tracer is None:
            return None
        return WorkerTelemetry(system, meters, tracer, held, self.depth_interval)
