"""What the command line adds for operators; the library itself only uses the
OpenTelemetry API (`aioworkers.telemetry`), the SDK and exporters are imported here,
lazily, when a flag asks for them.

| module | holds |
|---|---|
| `logs` | the text and JSON log formats (credentials hidden, one line a record, pid) |
| `exporters` | ``run --metrics-port`` / ``--otlp``: SDK providers, Prometheus, OTLP |
| `health` | the ``/metrics`` and ``/healthz`` answers |
| `http_endpoint` | the HTTP server they run on, in a thread of its own |
| `stats_command` | ``aioworkers stats`` (``--json``, ``--watch``, ``--fail-if``) |
"""

from .exporters import Exporters
from .health import Health
from .logs import (
    LOG_FORMATS,
    TEXT_FORMAT,
    TEXT_FORMAT_PID,
    JsonFormatter,
    RedactingFormatter,
    configure_logging,
)
from .stats_command import Threshold, stats, threshold

__all__ = [
    "LOG_FORMATS",
    "TEXT_FORMAT",
    "TEXT_FORMAT_PID",
    "Exporters",
    "Health",
    "JsonFormatter",
    "RedactingFormatter",
    "Threshold",
    "configure_logging",
    "stats",
    "threshold",
]
