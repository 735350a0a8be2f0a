"""Connections of the PostgreSQL broker: the URL and its options, the error table, the pool
(opened on first use, schema version checked), the LISTEN connection, and connections of
the application handed to ``enqueue(conn=...)``."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..errors import BrokerUnavailable, ConfigError, redact_url
from ..retry import next_delay
from ._kit import map_exceptions
from ._postgres_sql import CHANNEL, SCHEMA_VERSION, Statements, check_schema

log = logging.getLogger("aioworkers")

Connection = asyncpg.Connection | PoolConnectionProxy

# -- the URL ----------------------------------------------------------------------------------

# Our options: every other query parameter goes to asyncpg (sslmode, ...).
_OPTIONS = (
    "poll",
    "pool_size",
    "schema",
    "command_timeout",
    "connect_timeout",
    "vacuum",
    "async_commit",
)


@dataclass(frozen=True)
class Settings:
    """A ``postgresql://`` URL read: the DSN for asyncpg, and our options."""

    dsn: str
    shown: str  # the URL with credentials hidden, for messages
    poll: float = 1.0
    pool_size: int = 10
    schema: str = "public"
    command_timeout: float = 30.0
    connect_timeout: float = 10.0
    vacuum: float = 60.0
    async_commit: bool = False  # leases and acks commit without their WAL flush (opt-in)


def parse_url(url: str) -> Settings:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise ConfigError(f"not a postgresql:// URL: {redact_url(url)!r}")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    ours = {name: query.pop(name) for name in _OPTIONS if name in query}
    dsn = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query)))
    return Settings(
        dsn=dsn,
        shown=redact_url(url),
        poll=_seconds(ours, "poll", 1.0, low=0.01),
        pool_size=int(_seconds(ours, "pool_size", 10, low=1)),
        schema=check_schema(ours.get("schema", "public")),
        command_timeout=_seconds(ours, "command_timeout", 30.0, low=0.1),
        connect_timeout=_seconds(ours, "connect_timeout", 10.0, low=0.1),
        vacuum=_seconds(ours, "vacuum", 60.0, low=0.0),
        async_commit=_switch(ours, "async_commit"),
    )


def _switch(query: dict[str, str], name: str) -> bool:
    raw = query.get(name, "off").lower()
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"postgresql:// ?{name}= must be on or off, got {query[name]!r}")


def _seconds(query: dict[str, str], name: str, default: float, low: float) -> float:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"postgresql:// ?{name}= must be a number, got {raw!r}") from None
    if not low <= value < float("inf"):
        raise ConfigError(f"postgresql:// ?{name}= must be at least {low}, got {raw!r}")
    return value


# -- the error table --------------------------------------------------------------------------

# SQLSTATE classes after which the same call may work: the connection broke (08), the
# transaction lost a race (40), the server is short of something (53), an operator or a
# failover stopped it (57: shutdown, starting up, cancelled), the OS failed it (58), a lock
# is taken (55), or the server is a standby now (25006: read-only after a failover).
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "55", "57", "58", "XX"})
_TRANSIENT_STATES = frozenset({"25006"})
_HINTS = {
    "28": "check the user and password in the URL",
    "3D": "create the database, or fix its name in the URL",
    "42P01": "run 'aioworkers migrate MODULE:ATTR' (or 'await app.migrate()')",
    "3F000": "run 'aioworkers migrate MODULE:ATTR' (or 'await app.migrate()')",
    "42501": "grant the user SELECT, INSERT, UPDATE, DELETE on the aioworkers_* tables",
}


def _server_error(exc: BaseException) -> BaseException:
    state = str(getattr(exc, "sqlstate", "") or "")
    text = f"postgresql: {type(exc).__name__} ({state}): {exc}"
    if state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES:
        return BrokerUnavailable(text)
    hint = _HINTS.get(state) or _HINTS.get(state[:2])
    return ConfigError(f"{text}; {hint}" if hint else text)


def _client_error(exc: BaseException) -> BaseException:
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return ConfigError(f"postgresql: {exc}")
    # "connection is closed", "another operation is in progress" after a cancelled call:
    # the pool hands out another connection next time.
    return BrokerUnavailable(f"postgresql: {type(exc).__name__}: {exc}")


ERRORS = map_exceptions(
    {
        asyncpg.PostgresError: _server_error,
        asyncpg.InterfaceError: _client_error,
        asyncpg.exceptions.InternalClientError: _client_error,
        OSError: lambda exc: BrokerUnavailable(f"postgresql: cannot connect: {exc}"),
        TimeoutError: lambda exc: BrokerUnavailable(f"postgresql: no reply in time: {exc}"),
    }
)


# -- the pool ---------------------------------------------------------------------------------


def behind(version: int, where: str) -> ConfigError:
    return ConfigError(
        f"the aioworkers tables in {where} are at schema version {version}, this aioworkers "
        f"needs {SCHEMA_VERSION}: run 'aioworkers migrate MODULE:ATTR' (or 'await "
        "app.migrate()') once; aioworkers never changes a database by itself"
    )


def ahead(version: int, where: str) -> ConfigError:
    return ConfigError(
        f"the aioworkers tables in {where} are at schema version {version}, newer than the "
        f"{SCHEMA_VERSION} this aioworkers knows: upgrade aioworkers"
    )


async def schema_version(conn: Connection, sql: Statements) -> int:
    """The schema version of the database (0: never migrated), read without an error (a
    failed statement would abort the application's transaction)."""
    if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", sql.version_table):
        return int(await conn.fetchval(sql.version))
    return 0


def check_version(version: int, where: str) -> None:
    if version < SCHEMA_VERSION:
        raise behind(version, where)
    if version > SCHEMA_VERSION:
        raise ahead(version, where)


async def _keep_session(conn: Connection) -> None:
    """Nothing to reset when a connection goes back to the pool: the broker never SETs,
    LISTENs, locks or opens a cursor on it (asyncpg still rolls back a transaction left
    open). asyncpg's default reset costs a round trip on every call."""


class Pool:
    """The broker's connection pool, opened on first use in the running event loop (a pool
    belongs to one loop), its schema version checked once it has connected."""

    def __init__(self, settings: Settings, sql: Statements) -> None:
        self.settings = settings
        self.sql = sql
        self.database = ""  # current_database(), once connected
        self._pool: asyncpg.Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._checked = False

    def where(self) -> str:
        return f"{self.settings.shown} (schema {self.settings.schema})"

    async def _open(self) -> asyncpg.Pool:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._pool is not None:
                self._pool.terminate()  # of a loop that is gone: its sockets cannot be used
            self._pool, self._loop, self._lock, self._checked = None, loop, asyncio.Lock(), False
        assert self._lock is not None
        async with self._lock:
            if self._pool is None:
                s = self.settings
                self._pool = asyncpg.create_pool(
                    s.dsn,
                    min_size=0,
                    max_size=s.pool_size,
                    command_timeout=s.command_timeout,
                    timeout=s.connect_timeout,
                    reset=_keep_session,
                )
                await self._pool
            if not self._checked:
                async with self._pool.acquire(timeout=self.settings.connect_timeout) as conn:
                    self.database = await conn.fetchval("SELECT current_database()")
                    check_version(await schema_version(conn, self.sql), self.where())
                self._checked = True
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A connection of the pool; client errors mapped (`ERRORS`)."""
        with ERRORS:
            pool = await self._open()
            async with pool.acquire(timeout=self.settings.connect_timeout) as conn:
                yield conn

    async def raw(self) -> asyncpg.Connection:
        """A connection of its own (not from the pool), for migrations; close it."""
        with ERRORS:
            return await asyncpg.connect(self.settings.dsn, timeout=self.settings.connect_timeout)

    async def aclose(self) -> None:
        pool, self._pool, self._checked = self._pool, None, False
        if pool is None:
            return
        if self._loop is not asyncio.get_running_loop():
            pool.terminate()
            return
        try:
            await asyncio.wait_for(pool.close(), 5.0)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()


# -- LISTEN -----------------------------------------------------------------------------------


class Listener:
    """One connection that LISTENs for new jobs and calls ``wake(queue)`` (``""``: any
    queue). Best effort: while it is down, fetches poll. Reconnects with backoff when a
    fetch asks for it; after a reconnect every waiter is woken, since notifications sent
    meanwhile are lost."""

    def __init__(self, settings: Settings, wake: Callable[[str], None]) -> None:
        self.settings = settings
        self.wake = wake
        self._conn: asyncpg.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._connecting: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    def ensure(self) -> None:
        """Start (re)connecting in the background if down and the backoff allows."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._forget()
            self._loop = loop
        if self.up or (self._connecting is not None and not self._connecting.done()):
            return
        if time.monotonic() < self._retry_at:
            return
        self._connecting = loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            conn = await asyncpg.connect(self.settings.dsn, timeout=self.settings.connect_timeout)
            await conn.add_listener(CHANNEL, self._on_notify)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._failures += 1
            delay = next_delay(self._failures, base=0.5, cap=30.0)
            self._retry_at = time.monotonic() + delay
            log.warning(
                "postgresql: cannot LISTEN for new jobs (polling meanwhile, retry in %.1fs): %s",
                delay,
                exc,
            )
            return
        conn.add_termination_listener(self._on_lost)
        if self._failures:
            log.info("postgresql: listening for new jobs again")
        self._conn, self._failures = conn, 0
        self.wake("")  # what was notified while we were not listening

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self.wake(str(payload))

    def _on_lost(self, conn: object) -> None:
        if conn is self._conn:
            self._conn = None

    def _forget(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
        self._conn, self._connecting = None, None

    async def aclose(self) -> None:
        task, self._connecting = self._connecting, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        if self._loop is not asyncio.get_running_loop():
            conn.terminate()
            return
        try:
            await asyncio.wait_for(conn.close(), 2.0)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()


# -- the application's connections ------------------------------------------------------------

# Connections of the application already checked (same database, schema up to date).
_CHECKED: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


async def driver_connection(conn: object) -> Connection:
    """The asyncpg connection behind what ``enqueue(conn=...)`` was given: an asyncpg
    connection (or a pool's), or SQLAlchemy's ``AsyncConnection`` / ``AsyncSession`` on the
    ``postgresql+asyncpg`` driver, whose transaction is begun if it was not yet (as its first
    statement would): the job is then part of it."""
    if isinstance(conn, asyncpg.Connection | PoolConnectionProxy):
        return conn
    if type(conn).__module__.startswith("sqlalchemy."):
        return await _sqlalchemy_driver(conn)
    raise ConfigError(
        "enqueue(conn=...) takes an asyncpg connection, or a SQLAlchemy AsyncConnection or "
        f"AsyncSession on postgresql+asyncpg; got {type(conn).__name__}"
    )


async def _sqlalchemy_driver(conn: Any) -> Connection:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    if isinstance(conn, AsyncSession):
        conn = await conn.connection()  # begins the session's transaction if needed
    if not isinstance(conn, AsyncConnection):
        raise ConfigError(f"enqueue(conn=...) cannot use a {type(conn).__name__}")
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    if not isinstance(driver, asyncpg.Connection):
        raise ConfigError(
            "enqueue(conn=...) with SQLAlchemy needs the asyncpg driver "
            f"(postgresql+asyncpg://), got {type(driver).__name__}"
        )
    if not driver.is_in_transaction() and await conn.get_isolation_level() != "AUTOCOMMIT":
        # SQLAlchemy's asyncpg adapter sends BEGIN with the first statement it runs: run
        # one, or the job would be committed at once, outside the application's transaction.
        await conn.exec_driver_sql("SELECT 1")
    return driver


async def check_connection(conn: Connection, sql: Statements, pool: Pool) -> None:
    """Once per connection: it reaches the broker's database, and the schema is current."""
    # A pool wraps its connection in a new proxy at every acquire: key on what it wraps.
    key = getattr(conn, "_con", None) or conn
    if _CHECKED.get(key) == sql.schema:
        return
    if not pool.database:
        async with pool.connection():
            pass
    with ERRORS:
        database = await conn.fetchval("SELECT current_database()")
        version = await schema_version(conn, sql)
    if database != pool.database:
        raise ConfigError(
            f"enqueue(conn=...): the connection is to database {database!r}, the broker's "
            f"is {pool.database!r}: no worker would see the job"
        )
    check_version(version, pool.where())
    _CHECKED[key] = sql.schema
