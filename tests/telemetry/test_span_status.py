"""The consumer span's status follows the outcome's name, as a table: only an attempt that
failed (retried, dead, lease lost) is an error; every other outcome is a decision of a
healthy worker, whatever reason it carries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from aioworkers.brokers.base import Delivery
from aioworkers.envelope import Envelope

from .conftest import Otel


@dataclass
class Settled:
    envelope: Envelope | None = None
    task: Any = None
    error: BaseException | None = None
    duration: float = 0.0
    started_at: float = 0.0


class Reason(Exception):
    """A reason some runtimes carry with an outcome that is no failure."""


@pytest.mark.parametrize(
    ("name", "error", "status", "exception"),
    [
        ("ok", None, StatusCode.UNSET, None),
        ("retried", RuntimeError("boom"), StatusCode.ERROR, "RuntimeError"),
        ("dead", ValueError("bad"), StatusCode.ERROR, "ValueError"),
        ("lease_lost", None, StatusCode.ERROR, None),
        ("lease_lost", RuntimeError("boom"), StatusCode.ERROR, "RuntimeError"),
        ("released", Reason("shutdown"), StatusCode.UNSET, None),
        ("duplicate", Reason("key is done"), StatusCode.UNSET, None),
        ("deferred", Reason("key is busy"), StatusCode.UNSET, None),
        ("cancelled", None, StatusCode.UNSET, None),
        ("snoozed", None, StatusCode.UNSET, None),
        ("throttled", None, StatusCode.UNSET, None),
    ],
)
def test_span_status_follows_the_outcome(
    otel: Otel, name: str, error: BaseException | None, status: StatusCode, exception: str | None
) -> None:
    worker = otel.telemetry().for_worker("memory", list)
    assert worker is not None
    assert worker.tracer is not None
    with worker.tracer.start_as_current_span("process q"):
        worker.settled(name, Delivery("q", "m1", b"{}"), Settled(error=error))
    (span,) = otel.finished()
    assert span.attributes is not None
    assert span.attributes["aioworkers.job.outcome"] == name
    assert span.status.status_code is status
    types = [e.attributes["exception.type"] for e in span.events if e.attributes]
    assert types == ([exception] if exception else [])


def test_outside_a_recording_span_nothing_is_marked(otel: Otel) -> None:
    # Outside a recording span (a failing propagator ran the job untraced): nothing to mark.
    worker = otel.telemetry().for_worker("memory", list)
    assert worker is not None
    with trace.use_span(trace.INVALID_SPAN):
        worker.settled("dead", Delivery("q", "m1", b"{}"), Settled(error=ValueError("x")))
    assert otel.finished() == []
