"""Broker backends, each imported only when its URL scheme is used."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from ..errors import ConfigError, redact
from .base import (
    Broker,
    ConfiguredLease,
    DeadLetter,
    DeadLetterAdmin,
    DeadLetterPage,
    DeadLetterPages,
    DeadLetterWriter,
    Delivery,
    FileBacked,
    MessagingSystem,
    QueueDepth,
    QueueNaming,
    Totals,
)

__all__ = [
    "SCHEMES",
    "Broker",
    "ConfiguredLease",
    "DeadLetter",
    "DeadLetterAdmin",
    "DeadLetterPage",
    "DeadLetterPages",
    "DeadLetterWriter",
    "Delivery",
    "FileBacked",
    "MessagingSystem",
    "QueueDepth",
    "QueueNaming",
    "Totals",
    "check_url",
    "open_broker",
]

# scheme -> (module, class, the extra that installs its client). A static table: names
# from configuration never reach import machinery beyond it.
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "memory": (".memory", "MemoryBroker", ""),
    "redis": (".redis", "RedisBroker", "redis"),
    "rediss": (".redis", "RedisBroker", "redis"),
    "amqp": (".amqp", "AmqpBroker", "amqp"),
    "amqps": (".amqp", "AmqpBroker", "amqp"),
    "sqs": (".sqs", "SqsBroker", "sqs"),
    "sqlite": (".sqlite", "SqliteBroker", ""),
    "postgresql": (".postgres", "PostgresBroker", "postgres"),
    "postgres": (".postgres", "PostgresBroker", "postgres"),
}
SCHEMES = tuple(_BACKENDS)


def check_url(url: str) -> str:
    """The URL's scheme, or a `ConfigError` that says which schemes exist."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigError(f"unknown broker URL {redact(url)!r}: the scheme must be one of {known}")
    return scheme


def open_broker(url: str, *, visibility_timeout: float) -> Broker:
    """Create the broker for ``url`` (nothing connects until first use)."""
    scheme = check_url(url)
    module_name, class_name, extra = _BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name, __package__)
    except ImportError as exc:
        raise ConfigError(
            f"{scheme}:// needs its client library: pip install 'aio-job-workers[{extra}]' ({exc})"
        ) from None
    backend = getattr(module, class_name)
    if scheme == "memory":
        broker: Broker = backend(visibility_timeout=visibility_timeout)
    else:
        broker = backend(url, visibility_timeout=visibility_timeout)
    return broker
