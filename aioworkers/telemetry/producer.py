"""What one enqueue batch reports: producer spans and the sent-messages counter."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import SpanKind, Status, StatusCode

from .conventions import DESTINATION, ERROR_TYPE, MESSAGE_ID, OPERATION, SYSTEM, TASK

if TYPE_CHECKING:
    from ..envelope import Envelope
    from .metrics import Metrics


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
                MESSAGE_ID: env.id,
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
