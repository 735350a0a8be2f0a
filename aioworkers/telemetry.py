"""OpenTelemetry metrics and traces: the one module that uses the OpenTelemetry API.

Only the API is needed at run time. Whether a real (SDK) provider is configured is
checked when a worker is built and once per enqueue batch, never per job: with none
configured `Telemetry.for_worker` and `Telemetry.producer` return ``None`` and the
runtime skips every call on its hot path.

Names follow the OpenTelemetry messaging semantic conventions where they define one:

Every instrument carries ``messaging.system`` and ``messaging.destination.name`` (the
queue); besides those:

| instrument | kind | unit | more attributes |
|---|---|---|---|
| ``messaging.client.sent.messages`` | counter | {message} | operation ``send``, error.type |
| ``messaging.client.consumed.messages`` | counter | {message} | operation ``receive`` |
| ``messaging.process.duration`` | histogram | s | operation ``process``, task, error.type |
| ``aioworkers.jobs`` | counter | {job} | task, ``aioworkers.job.outcome`` |
| ``aioworkers.queue.lag`` | gauge | s | |
| ``aioworkers.jobs.in_flight`` | gauge | {job} | |
| ``aioworkers.queue.depth`` | gauge | {job} | ``aioworkers.queue.state`` |
| ``aioworkers.lease.extensions`` | counter | {lease} | |
| ``aioworkers.lease.lost`` | counter | {lease} | |

Per job, the hot path makes one SDK call, the duration histogram's ``record``: counts are
plain dict increments read by observable counters, and the lag gauge keeps a running
maximum, because each synchronous instrument call costs the SDK about 10 us. Histograms
are recorded in a context with no valid span, so the SDK samples no exemplar for them
(which would cost as much again).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import Token
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import SpanKind, Status, StatusCode

from .brokers.base import Delivery, QueueDepth

if TYPE_CHECKING:
    from ._runtime.executor import Outcome
    from .envelope import Envelope

__all__ = ["OUTCOMES", "Telemetry", "WorkerTelemetry", "messaging_system"]

log = logging.getLogger("aioworkers")

SCOPE = "aioworkers"
# Every outcome a settled (or abandoned) delivery is counted as.
OUTCOMES = ("ok", "retried", "dead", "released", "lease_lost", "duplicate", "deferred")
DEPTH_STATES = ("ready", "in_flight", "delayed", "dead")
DEFAULT_DEPTH_INTERVAL = 15.0
FINAL_POLL = 1.0  # seconds a stopping worker waits for its last depth poll
# The semantic conventions' advice for messaging.process.duration.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
LAG_WINDOW = 60.0  # the lag gauge reports the longest wait of the last 1-2 windows
# The context histograms are recorded in: an invalid span, so the SDK samples no exemplar
# (an empty Context is falsy, and the SDK would take the current one instead).
_NO_SPAN = trace.set_span_in_context(trace.INVALID_SPAN, otel_context.Context())

SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
OPERATION = "messaging.operation.name"
ERROR_TYPE = "error.type"
TASK = "aioworkers.task.name"
OUTCOME = "aioworkers.job.outcome"
STATE = "aioworkers.queue.state"
UNKNOWN_TASK = "_unknown"  # a name read from a message is not a safe metric label

_SYSTEMS = {"redis": "redis", "rediss": "redis", "amqp": "rabbitmq", "amqps": "rabbitmq"}


def messaging_system(broker_name: str) -> str:
    """``messaging.system`` for a broker URL (redacted) or a broker class name."""
    scheme, sep, _ = broker_name.partition("://")
    if not sep:
        return broker_name.lower().removesuffix("broker") or "custom"
    return _SYSTEMS.get(scheme.lower(), "aws_sqs" if scheme.lower() == "sqs" else scheme.lower())


def _real_meter_provider(provider: metrics.MeterProvider | None) -> metrics.MeterProvider | None:
    provider = provider or metrics.get_meter_provider()
    # The API's own providers (the proxy before one is set, the no-op) record nothing.
    if isinstance(provider, metrics.NoOpMeterProvider) or type(provider).__name__ in (
        "_ProxyMeterProvider",
        "NoOpMeterProvider",
    ):
        return None
    return provider


def _real_tracer_provider(provider: trace.TracerProvider | None) -> trace.TracerProvider | None:
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
        provider = _real_meter_provider(self._meter_provider)
        return None if provider is None else Metrics.of(provider)

    def tracer(self) -> trace.Tracer | None:
        """The tracer, or None when no real TracerProvider is configured."""
        if not self.enabled:
            return None
        provider = _real_tracer_provider(self._tracer_provider)
        return None if provider is None else provider.get_tracer(SCOPE)

    def producer(self, system: str) -> Producer | None:
        """What `App.enqueue_many` reports to, for one batch; None when all is off."""
        meters, tracer = self.metrics(), self.tracer()
        if meters is None and tracer is None:
            return None
        return Producer(system, meters, tracer)

    def for_worker(
        self, system: str, held: Callable[[], Iterable[Delivery]]
    ) -> WorkerTelemetry | None:
        """What one worker reports to; None when all is off (checked once, here).
        ``held`` returns the deliveries the worker holds now (for the in-flight gauge)."""
        meters, tracer = self.metrics(), self.tracer()
        if meters is None and tracer is None:
            return None
        return WorkerTelemetry(system, meters, tracer, held, self.depth_interval)


class Metrics:
    """The instruments of one MeterProvider, shared by every app and worker using it."""

    _by_provider: dict[int, tuple[metrics.MeterProvider, Metrics]] = {}  # noqa: RUF012

    @classmethod
    def of(cls, provider: metrics.MeterProvider) -> Metrics:
        # Instruments are created once per provider: a second registration of a name
        # would be refused, and the observable gauges read every worker of the process.
        entry = cls._by_provider.get(id(provider))
        if entry is None or entry[0] is not provider:
            entry = cls._by_provider[id(provider)] = (provider, cls(provider))
        return entry[1]

    def __init__(self, provider: metrics.MeterProvider) -> None:
        meter = provider.get_meter(SCOPE)
        self.workers: set[WorkerTelemetry] = set()
        # Per-job counts are plain dict increments, read by observable counters when a
        # reader collects: an SDK counter.add costs several microseconds a call. They
        # live here, per provider, so totals never go down when a worker stops.
        self.settled: Counter[tuple[str, str, str, str]] = Counter()  # system, queue, task, outcome
        self.fetched: Counter[tuple[str, str]] = Counter()  # system, queue
        # The depth last polled by any worker of the process, kept once it stops.
        self.depths: dict[tuple[str, str], QueueDepth] = {}
        self.lags: dict[tuple[str, str], LagWindow] = {}  # system, queue
        self.sent = meter.create_counter(
            "messaging.client.sent.messages", "{message}", "Messages a producer published"
        )
        meter.create_observable_counter(
            "messaging.client.consumed.messages",
            [self._observe_fetched],
            "{message}",
            "Messages handed to a worker",
        )
        self.duration = meter.create_histogram(
            "messaging.process.duration",
            "s",
            "Time a handler ran, per attempt",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        meter.create_observable_counter(
            "aioworkers.jobs", [self._observe_settled], "{job}", "Deliveries settled, by outcome"
        )
        meter.create_observable_gauge(
            "aioworkers.queue.lag",
            [self._observe_lag],
            "s",
            "Longest time from enqueue (or eta) to the start of a job's first attempt, over "
            f"the jobs settled in the last {LAG_WINDOW:.0f}-{2 * LAG_WINDOW:.0f} s",
        )
        self.extensions = meter.create_counter(
            "aioworkers.lease.extensions", "{lease}", "Leases extended by the heartbeat"
        )
        self.lost = meter.create_counter(
            "aioworkers.lease.lost", "{lease}", "Leases found lost by the heartbeat"
        )
        meter.create_observable_gauge(
            "aioworkers.jobs.in_flight",
            [self._observe_in_flight],
            "{job}",
            "Deliveries a worker holds (running, or fetched and waiting for a slot)",
        )
        meter.create_observable_gauge(
            "aioworkers.queue.depth",
            [self._observe_depth],
            "{job}",
            "Jobs per queue by state, as last polled from the broker",
        )

    def _observe_settled(self, options: CallbackOptions) -> Iterator[Observation]:
        for (system, queue, task, outcome), n in self.settled.copy().items():
            attrs = {SYSTEM: system, DESTINATION: queue, TASK: task, OUTCOME: outcome}
            yield Observation(n, attrs)

    def _observe_fetched(self, options: CallbackOptions) -> Iterator[Observation]:
        for (system, queue), n in self.fetched.copy().items():
            yield Observation(n, {SYSTEM: system, DESTINATION: queue, OPERATION: "receive"})

    def _observe_lag(self, options: CallbackOptions) -> Iterator[Observation]:
        now = time.time()
        for (system, queue), window in self.lags.copy().items():
            yield Observation(window.longest(now), {SYSTEM: system, DESTINATION: queue})

    def _observe_in_flight(self, options: CallbackOptions) -> Iterator[Observation]:
        held: Counter[tuple[str, str]] = Counter()
        for worker in list(self.workers):
            held.update((worker.system, d.queue) for d in worker.held())
            for queue in worker.depths.copy():
                held[(worker.system, queue)] += 0  # a queue with nothing held reports 0
        for (system, queue), n in held.items():
            yield Observation(n, {SYSTEM: system, DESTINATION: queue})

    def _observe_depth(self, options: CallbackOptions) -> Iterator[Observation]:
        # Copied: a reader may collect from another thread (the /metrics endpoint).
        for (system, queue), depth in self.depths.copy().items():
            for state in DEPTH_STATES:
                attrs = {SYSTEM: system, DESTINATION: queue, STATE: state}
                yield Observation(getattr(depth, state), attrs)


class LagWindow:
    """The longest lag seen in the current window of `LAG_WINDOW` seconds and the one
    before it (windows aligned on the epoch). Only the event loop writes it; readers (the
    gauge's callback, from any reader's thread) only compute, so a reader collecting at
    least once a window sees every maximum, however many readers there are."""

    __slots__ = ("current", "index", "previous")

    def __init__(self) -> None:
        self.index = 0  # the window `current` belongs to
        self.current = 0.0
        self.previous = 0.0  # the window before it

    def add(self, lag: float, now: float) -> None:
        index = int(now // LAG_WINDOW)
        if index != self.index:
            self.previous = self.current if index == self.index + 1 else 0.0
            self.current = 0.0
            self.index = index
        if lag > self.current:
            self.current = lag

    def longest(self, now: float) -> float:
        # Read once each: the loop may roll the window meanwhile.
        index, current, previous = self.index, self.current, self.previous
        behind = int(now // LAG_WINDOW) - index
        if behind <= 0:
            return max(current, previous)
        return current if behind == 1 else 0.0


# Only bodies this small are parsed again for their headers when they failed decoding.
SALVAGE_LIMIT = 64 * 1024


def _salvage_headers(body: bytes) -> dict[str, str] | None:
    """The string headers of an undecodable body that is still a JSON object, or None."""
    if len(body) > SALVAGE_LIMIT:
        return None
    try:
        doc = orjson.loads(body)
    except (orjson.JSONDecodeError, RecursionError):
        return None
    headers = doc.get("headers") if isinstance(doc, dict) else None
    if not isinstance(headers, dict):
        return None
    return {k: v for k, v in headers.items() if isinstance(k, str) and isinstance(v, str)}


class Producer:
    """Reports one enqueue batch: a PRODUCER span per job whose context travels in the
    envelope headers (W3C traceparent / tracestate), and the sent-messages counter."""

    __slots__ = ("_metrics", "_pending", "_system", "_tracer")

    def __init__(self, system: str, meters: Metrics | None, tracer: trace.Tracer | None) -> None:
        self._system = system
        self._metrics = meters
        self._tracer = tracer
        # (queue, delay) -> spans of the jobs of that publish call, and how many jobs.
        self._pending: dict[tuple[str, float], tuple[list[trace.Span], list[int]]] = {}

    def start(self, queue: str, delay: float, env: Envelope) -> None:
        """A job for the publish call ``(queue, delay)``: start its span and write the
        span's context into ``env.headers``."""
        spans, count = self._pending.setdefault((queue, delay), ([], [0]))
        count[0] += 1
        if self._tracer is None:
            return
        span = self._tracer.start_span(
            f"send {queue}",
            kind=SpanKind.PRODUCER,
            attributes={
                SYSTEM: self._system,
                DESTINATION: queue,
                OPERATION: "send",
                "messaging.message.id": env.id,
                TASK: env.task,
            },
        )
        spans.append(span)
        inject(env.headers, context=trace.set_span_in_context(span))

    def published(self, queue: str, delay: float, error: BaseException | None = None) -> None:
        """The jobs for ``(queue, delay)`` were published (or failed with ``error``)."""
        spans, count = self._pending.pop((queue, delay), ([], [0]))
        if self._metrics is not None and count[0]:
            attrs = {SYSTEM: self._system, DESTINATION: queue, OPERATION: "send"}
            if error is not None:
                attrs[ERROR_TYPE] = type(error).__qualname__
            self._metrics.sent.add(count[0], attrs)
        for span in spans:
            if error is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, type(error).__qualname__))
            span.end()

    def failed(self, error: BaseException) -> None:
        """The batch failed: end every span not yet ended, with ``error``."""
        for queue, delay in list(self._pending):
            self.published(queue, delay, error)


class WorkerTelemetry:
    """What one worker reports: the runtime calls `settled` wherever it counts an outcome,
    `fetched` once per fetch, `extended` once per heartbeat, and runs `poll_depth`."""

    def __init__(
        self,
        system: str,
        meters: Metrics | None,
        tracer: trace.Tracer | None,
        held: Callable[[], Iterable[Delivery]],
        depth_interval: float,
    ) -> None:
        self.system = system
        self.metrics = meters
        self.tracer = tracer
        self.held = held
        self.depth_interval = depth_interval
        self.depths: dict[str, QueueDepth] = {}
        self._attrs: dict[tuple[str, ...], dict[str, str]] = {}

    def _labels(self, kind: str, queue: str, task: str = "", extra: str = "") -> dict[str, str]:
        # One dict per label combination, built once: the SDK hashes it on every record.
        key = (kind, queue, task, extra)
        attrs = self._attrs.get(key)
        if attrs is None:
            attrs = self._attrs[key] = {SYSTEM: self.system, DESTINATION: queue}
            if kind in ("receive", "process"):
                attrs[OPERATION] = kind
            if task:
                attrs[TASK] = task
            if kind == "job":
                attrs[OUTCOME] = extra
            elif extra:
                attrs[ERROR_TYPE] = extra
        return attrs

    # -- metrics ------------------------------------------------------------------------

    def fetched(self, queue: str, count: int) -> None:
        if self.metrics is not None and count:
            self.metrics.fetched[(self.system, queue)] += count

    def settled(self, name: str, delivery: Delivery, outcome: Outcome | None) -> None:
        """``delivery`` was counted as outcome ``name`` (one of `OUTCOMES`)."""
        task = UNKNOWN_TASK
        if outcome is not None and outcome.task is not None:
            task = outcome.task.name
        m = self.metrics
        if m is not None:
            queue = delivery.queue
            m.settled[(self.system, queue, task, name)] += 1
            if outcome is not None and outcome.duration > 0 and outcome.envelope is not None:
                # The handler ran: duration and lag are per attempt.
                error = outcome.error
                error_type = "" if error is None else type(error).__qualname__
                m.duration.record(
                    outcome.duration, self._labels("process", queue, task, error_type), _NO_SPAN
                )
                env = outcome.envelope
                if env.attempt == 1 and delivery.count == 1:
                    # Fresh jobs only: a retry's or redelivery's wait includes its backoff
                    # or the lapsed lease, which says nothing about the queue's backlog.
                    started = outcome.started_at
                    lag = started - max(env.enqueued_at, env.eta or 0) / 1000
                    window = m.lags.get((self.system, queue))
                    if window is None:
                        window = m.lags[(self.system, queue)] = LagWindow()
                    window.add(lag, started)
        if self.tracer is not None:
            # Runs in the job's own task, where its consumer span is the current one.
            span = trace.get_current_span()
            if span.is_recording():
                span.set_attribute(OUTCOME, name)
                if outcome is not None and outcome.error is not None and name != "ok":
                    span.record_exception(outcome.error)
                    span.set_status(Status(StatusCode.ERROR, type(outcome.error).__qualname__))

    def extended(self, held: Sequence[Delivery], lost: Sequence[Delivery]) -> None:
        if self.metrics is None:
            return
        lost_ids = {id(d) for d in lost}
        kept = Counter(d.queue for d in held if id(d) not in lost_ids)
        for queue, n in kept.items():
            self.metrics.extensions.add(n, self._labels("lease", queue))
        for queue, n in Counter(d.queue for d in lost).items():
            self.metrics.lost.add(n, self._labels("lease", queue))

    async def poll_depth(self, depth: Callable[[str], Any], queues: Sequence[str]) -> None:
        """Poll ``depth(queue)`` every ``depth_interval`` seconds for the gauges (their
        callbacks only read what was polled last) until cancelled, and once more then."""
        if self.metrics is None:
            return
        self.metrics.workers.add(self)
        try:
            while True:
                await self._poll(depth, queues)
                await anyio.sleep(self.depth_interval)
        finally:
            # The worker is done: record the depths it leaves behind, briefly.
            with anyio.CancelScope(shield=True), anyio.move_on_after(FINAL_POLL):
                await self._poll(depth, queues)
            self.metrics.workers.discard(self)

    async def _poll(self, depth: Callable[[str], Any], queues: Sequence[str]) -> None:
        assert self.metrics is not None
        for queue in queues:
            try:
                self.depths[queue] = found = await depth(queue)
            except Exception as exc:
                log.debug("could not poll the depth of %r: %s", queue, exc)
            else:
                self.metrics.depths[(self.system, queue)] = found

    # -- traces -------------------------------------------------------------------------

    def start_attempt(
        self, delivery: Delivery, env: Envelope | None
    ) -> tuple[trace.Span, Token[otel_context.Context]]:
        """Start the CONSUMER span of one attempt and make it the current span (the parent
        of the spans the handler starts): a child of the producer span whose context the
        envelope headers carry (``env`` is None if the body could not be decoded). Returns
        the span and the token `end_attempt` takes, in the job's own task."""
        assert self.tracer is not None
        attrs: dict[str, Any] = {
            SYSTEM: self.system,
            DESTINATION: delivery.queue,
            OPERATION: "process",
            "aioworkers.delivery.count": delivery.count,
        }
        parent = None
        if env is not None:
            attrs["messaging.message.id"] = env.id
            attrs[TASK] = env.task
            attrs["aioworkers.job.attempt"] = env.attempt
            if env.headers:
                parent = extract(env.headers)
        else:
            headers = _salvage_headers(delivery.body)
            if headers:
                # JSON that failed the schema (a newer envelope, a bad field): keep the
                # dead letter's span in the trace of the request that enqueued it.
                parent = extract(headers)
        span = self.tracer.start_span(
            f"process {delivery.queue}", context=parent, kind=SpanKind.CONSUMER, attributes=attrs
        )
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    @staticmethod
    def end_attempt(
        span: trace.Span, token: Token[otel_context.Context], error: BaseException | None
    ) -> None:
        """End the attempt's span; ``error`` escaped the runtime (a bug or a cancel)."""
        if error is not None:
            span.record_exception(error)
        otel_context.detach(token)
        span.end()
