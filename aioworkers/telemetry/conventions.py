"""The names aioworkers reports under: its instrumentation scope and the attribute keys,
from the OpenTelemetry messaging semantic conventions where they define one."""

from __future__ import annotations

SCOPE = "aioworkers"

SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
OPERATION = "messaging.operation.name"
MESSAGE_ID = "messaging.message.id"
ERROR_TYPE = "error.type"
TASK = "aioworkers.task.name"
OUTCOME = "aioworkers.job.outcome"
STATE = "aioworkers.queue.state"
ATTEMPT = "aioworkers.job.attempt"
DELIVERY_COUNT = "aioworkers.delivery.count"

UNKNOWN_TASK = "_unknown"  # a name read from a message is not a safe metric label
