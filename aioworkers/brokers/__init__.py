"""Broker backends, each imported only when its URL scheme is used."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..errors import ConfigError, redact
from .base import Broker, DeadLetter, Delivery, QueueDepth

__all__ = ["SCHEMES", "Broker", "DeadLetter", "Delivery", "QueueDepth", "check_url", "open_broker"]

SCHEMES = ("memory", "redis", "rediss", "amqp", "amqps", "sqs")


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
    if scheme in ("redis", "rediss"):
        try:
            from .redis import RedisBroker
        except ImportError as exc:
            raise ConfigError(
                f"{scheme}:// needs the redis client: pip install 'aioworkers[redis]' ({exc})"
            ) from None
        return RedisBroker(url, visibility_timeout=visibility_timeout)
    if scheme == "sqs":
        try:
            from .sqs import SqsBroker
        except ImportError as exc:
            raise ConfigError(
                f"sqs:// needs aiobotocore: pip install 'aioworkers[sqs]' ({exc})"
            ) from None
        return SqsBroker(url, visibility_timeout=visibility_timeout)
    if scheme in ("amqp", "amqps"):
        try:
            from .amqp import AmqpBroker
        except ImportError as exc:
            raise ConfigError(
                f"{scheme}:// needs aio-pika: pip install 'aioworkers[amqp]' ({exc})"
            ) from None
        return AmqpBroker(url, visibility_timeout=visibility_timeout)
    from .memory import MemoryBroker

    return MemoryBroker(visibility_timeout=visibility_timeout)
