"""Idempotency stores: where a job's key is claimed while it runs and remembered once done.

The Redis and SQLite stores are imported only when their URL is used.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigError, redact
from .base import ClaimResult, IdempotencyStore, StoreUnavailable
from .memory import MemoryStore

__all__ = [
    "SCHEMES",
    "ClaimResult",
    "IdempotencyStore",
    "MemoryStore",
    "StoreUnavailable",
    "check_url",
    "default_url_for",
    "open_store",
]

SCHEMES = ("memory", "redis", "rediss", "sqlite")


def check_url(url: str) -> str:
    """The URL's scheme, or a `ConfigError` that says which schemes exist."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigError(
            f"unknown idempotency store URL {redact(url)!r}: the scheme must be one of {known}"
        )
    return scheme


def open_store(url: str) -> IdempotencyStore:
    """Create the store for ``url`` (nothing connects until first use)."""
    scheme = check_url(url)
    if scheme == "memory":
        return MemoryStore()
    if scheme == "sqlite":
        from .sqlite import SqliteStore

        return SqliteStore(url)
    try:
        from .redis import RedisStore
    except ImportError as exc:
        raise ConfigError(
            f"a redis:// idempotency store needs the redis client: "
            f"pip install 'aio-job-workers[redis]' ({exc})"
        ) from None
    return RedisStore(url)


def default_url_for(broker_url: str) -> str:
    """The store a broker URL implies, so every worker of the app sees every key: on a
    Redis broker, the same server (keys under ``<broker prefix>:idempotency``); on a
    SQLite broker, the same file; otherwise none (""), and keys stay in each process's
    memory."""
    parts = urlsplit(broker_url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        return broker_url  # its own table in the broker's file
    if scheme not in ("redis", "rediss"):
        return ""
    query = dict(parse_qsl(parts.query))
    query.pop("group", None)
    query["prefix"] = f"{query.get('prefix', 'aioworkers')}:idempotency"
    return urlunsplit(parts._replace(query=urlencode(query)))
