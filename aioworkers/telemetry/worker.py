"""What one worker reports: per-job metrics, the consumer span of each attempt, lease
counters, and the queue depths it polls."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import Token
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode

from .._runtime.outcome import OutcomeName, TaskInfo
from ..brokers.base import Delivery, QueueDepth
from ..envelope import Envelope, salvage_headers
from .conventions import (
    ATTEMPT,
    DELIVERY_COUNT,
    DESTINATION,
    ERROR_TYPE,
    MESSAGE_ID,
    OPERATION,
    OUTCOME,
    SYSTEM,
    TASK,
    UNKNOWN_TASK,
)
from .metrics import LagWindow

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("aioworkers")

FINAL_POLL = 1.0  # seconds a stopping worker waits for its last depth poll
# The outcomes whose attempt failed: its span's status is ERROR. The others (ok,
# released, duplicate, deferred, cancelled, snoozed, throttled) are a healthy worker's
# decisions, whatever reason they carry.
FAILED = frozenset((OutcomeName.RETRIED, OutcomeName.DEAD, OutcomeName.LEASE_LOST))
# The context histograms are recorded in: an invalid span, so the SDK samples no exemplar
# (an empty Context is falsy, and the SDK would take the current one instead).
_NO_SPAN = trace.set_span_in_context(trace.INVALID_SPAN, otel_context.Context())


class Settled(Protocol):
    """What `WorkerTelemetry.settled` reads of the runtime's outcome of a delivery (a
    structural type: telemetry imports nothing of the runtime)."""

    @property
    def envelope(self) -> Envelope | None: ...

    @property
    def task(self) -> TaskInfo | None: ...

    @property
    def error(self) -> BaseException | None: ...

    @property
    def duration(self) -> float:
        """Seconds the handler ran; 0 if it did not run."""
        ...

    @property
    def started_at(self) -> float:
        """When the handler started, epoch seconds."""
        ...


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

    def settled(self, name: str, delivery: Delivery, outcome: Settled | None) -> None:
        """``delivery`` was counted as outcome ``name`` (an `OutcomeName`)."""
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
                if name in FAILED:
                    _failed(span, name, None if outcome is None else outcome.error)

    def extended(self, held: Sequence[Delivery], lost: Sequence[Delivery]) -> None:
        if self.metrics is None:
            return
        lost_ids = {id(d) for d in lost}
        kept = Counter(d.queue for d in held if id(d) not in lost_ids)
        for queue, n in kept.items():
            self.metrics.extensions.add(n, self._labels("lease", queue))
        for queue, n in Counter(d.queue for d in lost).items():
            self.metrics.lost.add(n, self._labels("lease", queue))

    async def poll_depth(
        self, depth: Callable[[str], Awaitable[QueueDepth]], queues: Sequence[str]
    ) -> None:
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

    async def _poll(
        self, depth: Callable[[str], Awaitable[QueueDepth]], queues: Sequence[str]
    ) -> None:
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
            DELIVERY_COUNT: delivery.count,
        }
        parent = None
        if env is not None:
            attrs[MESSAGE_ID] = env.id
            attrs[TASK] = env.task
            attrs[ATTEMPT] = env.attempt
            if env.headers:
                parent = extract(env.headers)
        else:
            headers = salvage_headers(delivery.body)
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


def _failed(span: trace.Span, name: str, error: BaseException | None) -> None:
    """Mark the span of an attempt that failed as outcome ``name``, by ``error`` if known."""
    if error is None:
        span.set_status(Status(StatusCode.ERROR, name))
        return
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, type(error).__qualname__))
