"""What the command line adds for operators: log formats, the ``/metrics`` and
``/healthz`` endpoint, the OTLP exporter, and ``aioworkers stats``.

The library itself only uses the OpenTelemetry API (`aioworkers.telemetry`); the SDK and
exporters are imported here, lazily, when a flag asks for them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import operator
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from ._endpoint import MetricsEndpoint
from .brokers.base import QueueDepth
from .errors import ConfigError, printable, redact

if TYPE_CHECKING:
    from .app import App
    from .worker import Worker

log = logging.getLogger("aioworkers")

# -- logs ------------------------------------------------------------------------------

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Under --processes: several processes write to one stream.
TEXT_FORMAT_PID = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
LOG_FORMATS = ("text", "json")


def _ours(record: logging.LogRecord) -> bool:
    return record.name == "aioworkers" or record.name.startswith("aioworkers.")


class RedactingFormatter(logging.Formatter):
    """The usual text line, with credentials hidden (exceptions included). A message of
    aioworkers' own is one line: a non-printable character in it (a newline in a field
    taken from a message) is escaped, so it cannot forge a line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if _ours(record):
            record.message = printable(record.message, None)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts``, ``level``, ``logger``, ``message`` (and ``pid``
    with ``pid=True``), and for job failures the fields ``job_id``, ``task``,
    ``attempt``, ``queue``, ``duration``, ``error``, ``error_type``, ``outcome``;
    passwords in URLs hidden."""

    def __init__(self, *, pid: bool = False) -> None:
        super().__init__()
        self.pid = pid

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if self.pid:
            doc["pid"] = record.process
        job = getattr(record, "job", None)
        if isinstance(job, dict):
            doc.update({k: redact(v) if isinstance(v, str) else v for k, v in job.items()})
        if record.exc_info:
            doc["exception"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(doc, default=str).decode()


def configure_logging(level: str, fmt: str = "text", *, pid: bool = False) -> None:
    """Log to stderr at ``level`` as ``text`` or ``json`` lines (with the process id)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(pid=pid))
    else:
        handler.setFormatter(RedactingFormatter(TEXT_FORMAT_PID if pid else TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])


# -- exporters and /metrics, /healthz ------------------------------------------------------


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


def _otlp_exporters() -> tuple[Any, Any]:
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

            span_exporter, metric_exporter = _otlp_exporters()
            readers.append(PeriodicExportingMetricReader(metric_exporter))
            self.tracer_provider = TracerProvider(resource=_resource())
            self.tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        self.meter_provider = sdk_metrics.MeterProvider(
            metric_readers=readers, resource=_resource()
        )
        _set_global(self.meter_provider, self.tracer_provider)
        if port is not None:
            self.health = Health()
            self._server = _serve(args.metrics_host, port, self.health)
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

    from .telemetry import _real_meter_provider, _real_tracer_provider

    if _real_meter_provider(None) is not None:
        log.warning("the app set a MeterProvider already: --metrics-port/--otlp metrics are off")
    else:
        metrics.set_meter_provider(meter_provider)
    if tracer_provider is not None:
        if _real_tracer_provider(None) is not None:
            log.warning("the app set a TracerProvider already: --otlp traces are off")
        else:
            trace.set_tracer_provider(tracer_provider)


def _serve(
    host: str, port: int, health: Health, *, timeout: float = 5.0, max_connections: int = 64
) -> MetricsEndpoint:
    """Serve ``/metrics`` and ``/healthz``; see `MetricsEndpoint` for ``timeout`` (per
    connection) and ``max_connections``."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    def respond(path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        if path == "/healthz":
            ok, doc = health.check()
            return 200 if ok else 503, "application/json", orjson.dumps(doc)
        return 404, "text/plain", b"not found: try /metrics or /healthz\n"

    try:
        server = MetricsEndpoint(
            host, port, respond, timeout=timeout, max_connections=max_connections
        )
    except OSError as exc:
        raise ConfigError(f"--metrics-port {port} on {host}: {exc.strerror or exc}") from None
    server.start()
    log.info("serving /metrics and /healthz on http://%s:%d", host, server.server_port)
    return server


class Health:
    """Liveness: the event loop ticked lately, and the broker answered lately."""

    def __init__(self, *, tick: float = 1.0, stall: float = 10.0, broker_every: float = 5.0):
        self.tick = tick
        self.stall = stall
        self.broker_every = broker_every
        self.beat_at = 0.0
        self.broker_ok_at = 0.0
        self.broker_error = "not checked yet"
        self.state = "IDLE"

    async def run(self, app: App, worker: Worker) -> None:
        next_check = 0.0
        while True:
            now = time.monotonic()
            self.beat_at = now
            self.state = worker.state
            if now >= next_check:
                next_check = now + self.broker_every
                try:
                    async with asyncio.timeout(self.broker_every):
                        await app.broker.depth(worker.queues[0])
                except Exception as exc:
                    self.broker_error = redact(f"{type(exc).__name__}: {exc}")
                else:
                    self.broker_ok_at = time.monotonic()
                    self.broker_error = ""
            await asyncio.sleep(self.tick)

    def check(self) -> tuple[bool, dict[str, Any]]:
        """``(healthy, details)``; called from the endpoint's thread."""
        now = time.monotonic()
        loop_lag = now - self.beat_at if self.beat_at else None
        loop_ok = loop_lag is not None and loop_lag < self.stall
        broker_ok = bool(self.broker_ok_at) and now - self.broker_ok_at < 3 * self.broker_every
        worker_ok = self.state in ("RUNNING", "QUIET")
        doc = {
            "status": "ok" if loop_ok and broker_ok and worker_ok else "unhealthy",
            "worker": self.state,
            "loop": "responsive" if loop_ok else "stalled",
            "loop_seconds_since_tick": None if loop_lag is None else round(loop_lag, 3),
            "broker": "connected" if broker_ok else "unreachable",
        }
        if not broker_ok and self.broker_error:
            doc["broker_error"] = self.broker_error
        return doc["status"] == "ok", doc


# -- aioworkers stats ----------------------------------------------------------------------

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
FIELDS = ("ready", "in_flight", "delayed", "dead", "backlog")
_THRESHOLD = re.compile(r"\s*([a-z_-]+)\s*(>=|<=|==|!=|>|<)\s*(\d+(?:\.\d+)?)\s*")


@dataclass(frozen=True)
class Threshold:
    """``--fail-if 'dead>0'``: holds when the field compares true with the number."""

    field: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.field}{self.op}{self.value:g}"

    def holds(self, depth: QueueDepth) -> bool:
        return _OPS[self.op](_field(depth, self.field), self.value)


def _field(depth: QueueDepth, name: str) -> int:
    return depth.ready + depth.delayed if name == "backlog" else int(getattr(depth, name))


def threshold(text: str) -> Threshold:
    """Parse ``NAME OP NUMBER`` (argparse type of ``--fail-if``)."""
    match = _THRESHOLD.fullmatch(text)
    name = match.group(1).replace("-", "_") if match else ""
    if match is None or name not in FIELDS:
        raise argparse.ArgumentTypeError(
            f"expected NAME OP NUMBER, NAME one of {', '.join(FIELDS)} and OP one of "
            f"{' '.join(_OPS)} (for example 'dead>0'), got {text!r}"
        )
    return Threshold(name, match.group(2), float(match.group(3)))


class Rates:
    """Per-second rates of one queue between two polls: ``enqueued`` and ``done`` from
    the broker's counters where it has them (Redis: ``totals``), ``failed`` (dead-lettered)
    and ``backlog`` (change of ready + delayed) from the depths."""

    NAMES = ("enqueued", "done", "failed", "backlog")

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, QueueDepth, dict[str, int] | None]] = {}

    def update(
        self, queue: str, depth: QueueDepth, totals: dict[str, int] | None
    ) -> dict[str, float | None]:
        now = time.monotonic()
        last = self._last.get(queue)
        self._last[queue] = (now, depth, totals)
        if last is None:
            return dict.fromkeys(self.NAMES)
        then, before, old = last
        dt = max(now - then, 1e-9)
        if totals is not None and old is not None:
            dead = max(totals["dead"] - old["dead"], 0)
            enqueued: float | None = max(totals["added"] - old["added"], 0) / dt
            done: float | None = max(totals["left"] - old["left"] - dead, 0) / dt
        else:
            dead = max(depth.dead - before.dead, 0)
            enqueued = done = None
        backlog = (depth.ready + depth.delayed - before.ready - before.delayed) / dt
        return {"enqueued": enqueued, "done": done, "failed": dead / dt, "backlog": backlog}


async def _poll(app: App, queue: str) -> tuple[QueueDepth, dict[str, int] | None]:
    depth = await app.stats(queue)
    totals = getattr(app.broker, "totals", None)
    return depth, (await totals(queue) if totals is not None else None)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _trend(value: float | None) -> str:
    if value is None:
        return "-"
    arrow = "up" if value > 0.05 else "down" if value < -0.05 else "flat"
    return f"{arrow} {value:+,.1f}/s"


def _table(rows: dict[str, QueueDepth], rates: dict[str, dict[str, float | None]] | None) -> str:
    head = f"{'queue':<24} {'ready':>8} {'in_flight':>10} {'delayed':>8} {'dead':>8}"
    if rates is not None:
        head += f" {'enqueued/s':>11} {'done/s':>9} {'failed/s':>9}  backlog"
    lines = [head]
    for q, d in rows.items():
        line = f"{q:<24} {d.ready:>8} {d.in_flight:>10} {d.delayed:>8} {d.dead:>8}"
        if rates is not None:
            r = rates[q]
            line += (
                f" {_rate(r['enqueued']):>11} {_rate(r['done']):>9} {_rate(r['failed']):>9}"
                f"  {_trend(r['backlog'])}"
            )
        lines.append(line)
    return "\n".join(lines)


def _check(rows: dict[str, QueueDepth], thresholds: Sequence[Threshold]) -> list[str]:
    return [
        f"{t} holds on queue {q!r} ({t.field}={_field(d, t.field)})"
        for q, d in rows.items()
        for t in thresholds
        if t.holds(d)
    ]


async def stats(app: App, queues: Sequence[str], args: argparse.Namespace) -> int:
    """``aioworkers stats``: 0, or 1 when a ``--fail-if`` threshold holds."""
    thresholds: list[Threshold] = args.fail_if or []
    if args.watch is not None:
        if thresholds:
            raise ConfigError("--fail-if checks once: use it without --watch (e.g. from cron)")
        return await _watch(app, queues, args)
    rows = {q: await app.stats(q) for q in queues}
    if args.json:
        # The shape of a --watch refresh: rates need two polls, so here they are unknown.
        rates = dict.fromkeys(Rates.NAMES)
        print(_json_line(rows, dict.fromkeys(queues, rates)))
    else:
        print(_table(rows, None))
    alerts = _check(rows, thresholds)
    for alert in alerts:
        print(f"aioworkers: threshold {alert}", file=sys.stderr)
    return 1 if alerts else 0


def _now() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="seconds")


def _json_line(rows: dict[str, QueueDepth], rates: dict[str, dict[str, float | None]]) -> str:
    """``stats --json``, with or without ``--watch``: ``{"ts": .., "queues": {queue:
    {"ready": .., "in_flight": .., "delayed": .., "dead": .., "rates": {..}}}}``."""
    queues = {q: asdict(depth) | {"rates": rates[q]} for q, depth in rows.items()}
    return orjson.dumps({"ts": _now(), "queues": queues}).decode()


async def _watch(app: App, queues: Sequence[str], args: argparse.Namespace) -> int:
    rates = Rates()
    in_place = sys.stdout.isatty() and not args.json
    refreshes = 0
    while True:
        rows: dict[str, QueueDepth] = {}
        per_queue: dict[str, dict[str, float | None]] = {}
        for q in queues:
            depth, totals = await _poll(app, q)
            rows[q] = depth
            per_queue[q] = rates.update(q, depth, totals)
        stamp = _now()
        if args.json:
            print(_json_line(rows, per_queue), flush=True)
        else:
            header = f"{app.broker_name}  {stamp}  every {args.watch:g}s (Ctrl-C to stop)"
            prefix = "\x1b[H\x1b[2J" if in_place else ("\n" if refreshes else "")
            print(f"{prefix}{header}\n{_table(rows, per_queue)}", flush=True)
        refreshes += 1
        if args.count and refreshes >= args.count:
            return 0
        await asyncio.sleep(args.watch)
