"""The state store: what the workers of an app share beyond the queue (idempotency keys,
job records, cancel marks, schedule slots, limit leases, token buckets, unique keys).

`Store` (in `base`) is the protocol; `MemoryStore`, `SqliteStore`, `RedisStore` and
`PostgresStore` the backends, chosen by URL with `open_store`. All but the memory store
are imported only when their URL is used.
"""

from __future__ import annotations

import importlib
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigError, redact
from .base import (
    FINAL,
    STATUSES,
    Beat,
    ClaimResult,
    FinalStatus,
    IdempotencyStore,
    JobFinish,
    JobRecord,
    JobStatus,
    JobUpdate,
    Store,
    StoreUnavailable,
)
from .memory import MemoryStore

__all__ = [
    "ENV_STORE_URL",
    "FINAL",
    "SCHEMES",
    "STATUSES",
    "Beat",
    "ClaimResult",
    "FinalStatus",
    "IdempotencyStore",
    "JobFinish",
    "JobRecord",
    "JobStatus",
    "JobUpdate",
    "MemoryStore",
    "Store",
    "StoreUnavailable",
    "check_url",
    "default_url_for",
    "open_store",
]

# The store an `App` uses when ``store=`` is not given.
ENV_STORE_URL = "AIOWORKERS_STORE_URL"

# scheme -> (module, class, the extra that installs its client). A static table: names
# from configuration never reach import machinery beyond it.
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "memory": (".memory", "MemoryStore", ""),
    "redis": (".redis", "RedisStore", "redis"),
    "rediss": (".redis", "RedisStore", "redis"),
    "sqlite": (".sqlite", "SqliteStore", ""),
    "postgresql": (".postgres", "PostgresStore", "postgres"),
    "postgres": (".postgres", "PostgresStore", "postgres"),
}
SCHEMES = tuple(_BACKENDS)


def check_url(url: str) -> str:
    """The URL's scheme, or a `ConfigError` that says which schemes exist."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigError(f"unknown store URL {redact(url)!r}: the scheme must be one of {known}")
    return scheme


def open_store(url: str) -> Store:
    """Create the store for ``url`` (nothing connects until first use)."""
    scheme = check_url(url)
    if scheme == "memory":
        return MemoryStore()
    module_name, class_name, extra = _BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name, __package__)
    except ImportError as exc:
        raise ConfigError(
            f"a {scheme}:// store needs its client library: "
            f"pip install 'aio-job-workers[{extra}]' ({exc})"
        ) from None
    store: Store = getattr(module, class_name)(url)
    return store


def default_url_for(broker_url: str) -> str:
    """The store a broker URL implies, so every worker of the app shares its state: on a
    Redis broker, the same server (keys under ``<broker prefix>:idempotency``); on a SQLite
    broker, the same file; on a PostgreSQL broker, the same database (and schema);
    otherwise none (""): ``memory://`` is one process anyway (the `App` keeps a store in
    memory), and RabbitMQ and SQS have nowhere to keep it."""
    parts = urlsplit(broker_url)
    scheme = parts.scheme.lower()
    if scheme in ("sqlite", "postgresql", "postgres"):
        return broker_url  # its own tables in the broker's file or database
    if scheme not in ("redis", "rediss"):
        return ""
    query = dict(parse_qsl(parts.query))
    query.pop("group", None)
    query["prefix"] = f"{query.get('prefix', 'aioworkers')}:idempotency"
    return urlunsplit(parts._replace(query=urlencode(query)))
