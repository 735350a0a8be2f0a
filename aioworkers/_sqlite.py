"""One SQLite file used from asyncio: the connection lives on a thread of its own, so the
event loop never waits on the file or on another process's lock. Shared by the
``sqlite://`` broker and idempotency store."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigError

_T = TypeVar("_T")

HELP = "use sqlite:///relative/path.db or sqlite:////absolute/path.db"


def parse_url(url: str, what: str) -> tuple[str, dict[str, str]]:
    """The file path and query of a ``sqlite://`` URL; ``what`` names its use in errors."""
    parts = urlsplit(url)
    if parts.netloc:
        raise ConfigError(f"{what} sqlite:// takes a file path, not a host: {HELP}")
    # As in SQLAlchemy: three slashes then a relative path, four for an absolute one.
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not path or path == ":memory:":
        raise ConfigError(f"{what} sqlite:// needs a database file ({HELP}); or memory://")
    return path, dict(parse_qsl(parts.query))


def seconds_option(query: dict[str, str], name: str, default: float) -> float:
    """Pop ``name`` from ``query`` as positive, finite seconds."""
    raw = query.pop(name, None)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"sqlite:// ?{name}= must be seconds, got {raw!r}") from None
    if not 0 < value < float("inf"):
        raise ConfigError(f"sqlite:// ?{name}= must be > 0 seconds, got {raw!r}")
    return value


class SqliteFile:
    """The file at ``path``, opened on first use in WAL mode with ``synchronous=NORMAL``
    (durable across crashed processes; a power loss may drop the last commits), with
    ``schema`` applied. An `sqlite3.OperationalError` (a lock held past ``busy_timeout``,
    a full disk, a read-only file) is raised as ``unavailable``: the same call may work
    later."""

    def __init__(
        self, path: str, *, schema: str, busy_timeout: float, unavailable: type[Exception]
    ) -> None:
        self.path = path
        self._schema = schema
        self._busy_timeout = busy_timeout
        self._unavailable = unavailable
        self._db: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None

    def _connect(self) -> sqlite3.Connection:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        db = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(self._schema)
        except BaseException:
            db.close()
            raise
        return db

    def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        try:
            if self._db is None:
                self._db = self._connect()
            return fn(self._db)
        except sqlite3.OperationalError as exc:
            raise self._unavailable(f"sqlite {self.path}: {exc}") from exc

    def submit(self, fn: Callable[[sqlite3.Connection], _T]) -> asyncio.Future[_T]:
        """Run ``fn(connection)`` on the file's thread; calls run one at a time, in order."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="aioworkers-sqlite")
        return asyncio.get_running_loop().run_in_executor(self._thread, self._run, fn)

    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        # A cancelled caller stops waiting; the thread still finishes the call (each is one
        # transaction), which is what a lost reply from a networked server looks like.
        return await self.submit(fn)

    async def aclose(self) -> None:
        """Close the connection; a later call opens it again."""
        thread, self._thread = self._thread, None
        if thread is None:
            return

        def close() -> None:
            db, self._db = self._db, None
            if db is not None:
                db.close()

        await asyncio.get_running_loop().run_in_executor(thread, close)
        thread.shutdown(wait=False)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error: the write lock is
    taken up front, so two processes never deadlock upgrading a read to a write."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
