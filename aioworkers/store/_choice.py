"""Which state store an `App` uses: the one given (``store=``, or its old name
``idempotency=``), else ``AIOWORKERS_STORE_URL``, else the one its broker implies (its
Redis server, its SQLite file, its PostgreSQL database, memory for ``memory://``).
RabbitMQ and SQS imply none: a feature that needs shared state then refuses to start,
never falling back to each process's memory without being told (``store="memory://"``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from .._sqlite import absolute_url
from ..brokers.base import Broker, FileBacked, MessagingSystem
from ..errors import ConfigError
from . import ENV_STORE_URL, check_url, default_url_for, open_store
from .base import IdempotencyStore, Store

Given = str | IdempotencyStore | None


def _given(store: Given, idempotency: Given) -> Given:
    if store is not None and idempotency is not None:
        raise ConfigError("give store= only: idempotency= is its old name")
    chosen = store if store is not None else idempotency
    if chosen is None:
        chosen = os.environ.get(ENV_STORE_URL)
        if chosen is not None and not chosen.strip():
            raise ConfigError(
                f"{ENV_STORE_URL} is set but empty: unset it for the broker's default "
                "store, or give a store URL (redis://..., sqlite:///..., memory://)"
            )
    if isinstance(chosen, str):
        if not chosen.strip():
            raise ConfigError("the store URL is empty: give a URL, or None for the default")
        if check_url(chosen) == "sqlite":
            chosen = absolute_url(chosen)  # relative to where the app starts
    return chosen


class StoreChoice:
    """The app's store: configured now (URL checked), opened on first use."""

    def __init__(self, store: Given, idempotency: Given) -> None:
        chosen = _given(store, idempotency)
        self.url = chosen if isinstance(chosen, str) else ""
        self._store: IdempotencyStore | None = None if isinstance(chosen, str) else chosen

    def open(self, broker_url: str, broker: Broker | None) -> IdempotencyStore | None:
        """The store (created on first use), or None if none is given or implied."""
        if self._store is None:
            url = self.url or _default_url(broker_url, broker)
            if url:
                self._store = open_store(url)
        return self._store

    def require(self, broker_url: str, broker: Broker | None, broker_name: str) -> Store:
        """The store, whole: a `ConfigError` if there is none, or it keeps only keys."""
        store = self.open(broker_url, broker)
        if store is None:
            raise missing(["this feature"], broker_name)
        if not isinstance(store, Store):
            raise ConfigError(
                f"{type(store).__name__} keeps idempotency keys only: job records, cancel "
                "and the other shared state need a whole aioworkers.store.Store (give "
                "store='redis://...', 'sqlite:///...' or 'memory://')"
            )
        return store

    def opened(self) -> IdempotencyStore | None:
        """The store if it was opened (for closing), else None."""
        return self._store


def _default_url(broker_url: str, broker: Broker | None) -> str:
    if broker_url:
        if urlsplit(broker_url).scheme.lower() == "memory":
            return "memory://"
        return default_url_for(broker_url)
    if isinstance(broker, FileBacked):  # a broker instance that keeps its jobs in a file
        return f"sqlite:///{quote(str(broker.path))}"
    if isinstance(broker, MessagingSystem) and broker.messaging_system == "memory":
        return "memory://"
    if isinstance(broker, MessagingSystem) and broker.messaging_system == "postgresql":
        return _postgres_url(broker)  # its own tables in the broker's database
    return ""


def _postgres_url(broker: object) -> str:
    """The URL of a `PostgresBroker`'s database and schema (its ``settings``)."""
    settings = getattr(broker, "settings", None)
    dsn, schema = getattr(settings, "dsn", ""), getattr(settings, "schema", "public")
    if not dsn:
        return ""
    parts = urlsplit(dsn)
    query = urlencode([*parse_qsl(parts.query), ("schema", schema)])
    return urlunsplit(parts._replace(query=query))


def missing(needs: Sequence[str], broker_name: str) -> ConfigError:
    """The error for ``needs`` (what needs shared state) on a broker without a store."""
    return ConfigError(
        f"{', '.join(needs)} needs a state store shared by every worker, and the broker "
        f"{broker_name} has none: give App(store='redis://...') or "
        f"App(store='sqlite:///...'), or set {ENV_STORE_URL}; store='memory://' keeps the "
        "state in this one process only"
    )


__all__ = ["StoreChoice", "missing"]
