"""Log lines for operators: text or JSON, one line a record, credentials hidden, the
process id under ``--processes``."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

from ..errors import printable, redact

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
