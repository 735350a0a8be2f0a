"""Log formats and redaction, and the exporter flags' errors."""

from __future__ import annotations

import logging
import sys

import orjson
import pytest

from aioworkers.errors import ConfigError
from aioworkers.monitor import JsonFormatter, RedactingFormatter, threshold
from aioworkers.monitor.exporters import otlp_exporters

URL = "redis://user:p4ss@redis.internal:6379/0"


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("aioworkers", logging.ERROR, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_text_lines_hide_passwords_in_urls() -> None:
    line = RedactingFormatter("%(message)s").format(record("cannot reach %s", URL))
    assert line == "cannot reach redis://user:***@redis.internal:6379/0"


def test_json_lines_carry_the_job_fields_and_hide_passwords() -> None:
    job = {"job_id": "j1", "task": "t", "attempt": 2, "duration": 0.5, "outcome": "retried",
           "error": f"ConnectionError: {URL} refused"}  # fmt: skip
    try:
        raise RuntimeError(f"while talking to {URL}")
    except RuntimeError:
        rec = record("job failed %s", URL, job=job)
        rec.exc_info = sys.exc_info()
    doc = orjson.loads(JsonFormatter().format(rec))
    assert doc["level"] == "ERROR"
    assert doc["logger"] == "aioworkers"
    assert {k: doc[k] for k in ("job_id", "task", "attempt", "duration", "outcome")} == {
        "job_id": "j1", "task": "t", "attempt": 2, "duration": 0.5, "outcome": "retried"
    }  # fmt: skip
    assert "p4ss" not in orjson.dumps(doc).decode()
    assert doc["error"] == "ConnectionError: redis://user:***@redis.internal:6379/0 refused"
    assert "RuntimeError: while talking to redis://user:***@" in doc["exception"]


def test_threshold_parsing() -> None:
    t = threshold(" ready >= 1000 ")
    assert (t.field, t.op, t.value, str(t)) == ("ready", ">=", 1000.0, "ready>=1000")
    assert threshold("in-flight>5").field == "in_flight"


def test_otlp_protocol_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
    with pytest.raises(ConfigError, match="use http/protobuf or grpc"):
        otlp_exporters()
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc", None)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ConfigError, match="pip install opentelemetry-exporter-otlp-proto-grpc"):
        otlp_exporters()
