"""One SQLite file used from asyncio, shared by the ``sqlite://`` broker and idempotency
store. Writes run on one thread that owns the writing connection, reads (counts, lists)
on another with a connection of their own: the event loop never waits on the disk or on
another process's lock, and in WAL mode a long read never holds up a write."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .brokers._kit import map_exceptions
from .errors import ConfigError

log = logging.getLogger("aioworkers")
_T = TypeVar("_T")

HELP = "use sqlite:///relative/path.db or sqlite:////absolute/path.db"

# Errors after which the same call may work: another process holds the lock past the
# busy timeout, the disk is full or failing. Anything else is the configuration's fault.
# Primary codes: an error carries an extended one (SQLITE_IOERR_WRITE, SQLITE_BUSY_SNAPSHOT).
_TRANSIENT = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_PROTOCOL,
}


def transient(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _TRANSIENT


# Every open file, to drop its threads and connections in a forked child (gunicorn
# --preload): neither survives a fork, and a child must not use its parent's.
_FILES: weakref.WeakSet[SqliteFile] = weakref.WeakSet()


def _after_fork() -> None:
    for file in list(_FILES):
        file._forget()


os.register_at_fork(after_in_child=_after_fork)

# The WAL file is cut back to this after a checkpoint instead of keeping its high mark.
_WAL_LIMIT = 64 * 1024 * 1024


def parse_url(url: str, what: str) -> tuple[str, dict[str, str]]:
    """The absolute file path and the query of a ``sqlite:///`` URL (a relative path is
    taken from the working directory now); ``what`` names the URL's use in errors."""
    parts = urlsplit(url)
    if parts.netloc or not url.lower().startswith("sqlite:///") or parts.fragment:
        raise ConfigError(f"{what} {url!r} is not a sqlite:/// file URL: {HELP}")
    # As in SQLAlchemy: three slashes then a relative path, four for an absolute one.
    path = unquote(parts.path[1:])
    if not path or path == ":memory:":
        raise ConfigError(f"{what} sqlite:// needs a database file ({HELP}); or memory://")
    return os.path.abspath(path), dict(parse_qsl(parts.query, keep_blank_values=True))


def absolute_url(url: str) -> str:
    """``url`` with its path made absolute from the working directory now, so that every
    later use means the same file (and logs say which)."""
    path, _ = parse_url(url, "the URL")
    query = urlsplit(url).query
    return f"sqlite:///{quote(path)}" + (f"?{query}" if query else "")


def seconds_option(query: dict[str, str], name: str, default: float, low: float) -> float:
    """Pop ``name`` from ``query``: seconds, at least ``low``, finite."""
    raw = query.pop(name, None)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"sqlite:// ?{name}= must be seconds, got {raw!r}") from None
    if not low <= value < float("inf"):
        raise ConfigError(f"sqlite:// ?{name}= must be at least {low} seconds, got {raw!r}")
    return value


def _create_private(path: str) -> None:
    """Create ``path`` empty (a valid new database) with mode 0600, less if the umask takes
    more, unless it exists: SQLite would create it 0644 and the -wal and -shm files copy
    the database's mode, yet they hold job arguments. An existing file keeps its mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise ConfigError(f"sqlite {path}: cannot create the file: {exc.strerror}") from None
    os.close(fd)
    # Once per file (O_EXCL): a file made by mistake (another directory) strands its jobs.
    log.warning(
        "created the new SQLite file %s: only processes using this same file share its jobs",
        path,
    )


class SqliteFile:
    """The file at ``path``, opened on first use (created with ``schema`` and mode 0600 if
    it does not exist) in WAL mode with ``synchronous=NORMAL``: durable across crashed
    processes; a power loss may drop the last commits. A transient `sqlite3.Error` (a lock held past
    ``busy_timeout``, a full disk) is raised as ``unavailable``, any other as a
    `ConfigError` that names the file."""

    def __init__(
        self, path: str, *, schema: str, busy_timeout: float, unavailable: type[Exception]
    ) -> None:
        self.path = path
        self._schema = schema
        self._busy_timeout = busy_timeout
        self._unavailable = unavailable
        self._errors = map_exceptions({sqlite3.Error: self._error})
        self._forget()
        _FILES.add(self)

    def _forget(self) -> None:
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._closed = False
        # For the object's whole life, so every call, close included, runs in order.
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="aioworkers-sqlite")
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="aioworkers-sqlite-read")

    def _open(self, *, setup: bool) -> sqlite3.Connection:
        if setup:
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"sqlite {self.path}: cannot create its directory: {exc}"
                ) from None
        _create_private(self.path)
        db = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            if setup:
                self._setup(db)
        except BaseException:
            db.close()
            raise
        return db

    def _setup(self, db: sqlite3.Connection) -> None:
        # The switch to WAL does not wait on the busy timeout: processes opening a new
        # file at once retry it here.
        deadline = time.monotonic() + self._busy_timeout
        # Before WAL and the tables: it only takes effect on a new, empty file.
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        while True:
            try:
                (mode,) = db.execute("PRAGMA journal_mode").fetchone()
                if mode != "wal":
                    (mode,) = db.execute("PRAGMA journal_mode=WAL").fetchone()
                break
            except sqlite3.OperationalError as exc:
                if not transient(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if mode != "wal":
            raise ConfigError(
                f"sqlite {self.path}: the file system does not support WAL mode ({mode}); "
                "put the file on a local disk"
            )
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
        db.executescript(self._schema)

    def _error(self, exc: BaseException) -> Exception:
        """The one table: transient errors are ``unavailable``, others a `ConfigError`."""
        assert isinstance(exc, sqlite3.Error)
        if transient(exc):
            return self._unavailable(f"sqlite {self.path}: {exc}")
        return ConfigError(f"sqlite {self.path}: {exc} ({exc.sqlite_errorname}); {HELP}")

    def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._errors:
            if self._db is None:
                self._db = self._open(setup=True)
            return fn(self._db)

    def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._errors:
            if self._reader is None:
                self._reader = self._open(setup=False)
            db = self._reader
            db.execute("BEGIN")  # one snapshot for every statement of ``fn``
            try:
                return fn(db)
            finally:
                db.execute("COMMIT")

    def submit(self, fn: Callable[[sqlite3.Connection], _T]) -> asyncio.Future[_T]:
        """Run ``fn(connection)`` on the writing thread; calls run one at a time, in order."""
        self._closed = False
        return asyncio.get_running_loop().run_in_executor(self._writes, self._write, fn)

    def clean_up(self, fn: Callable[[sqlite3.Connection], None]) -> asyncio.Future[None]:
        """Like `submit`, for work left over by a call that was cancelled: if the file was
        closed meanwhile, it is closed again afterwards."""
        closed = self._closed
        future = asyncio.get_running_loop().run_in_executor(self._writes, self._write, fn)
        if closed:
            self._writes.submit(self._close_writer)
        return future

    def vacuum(self, db: sqlite3.Connection) -> None:
        """Give the pages that deleted rows freed back to the disk, 1000 at most, if the
        write lock is free now (it never waits: the caller is an idle poll)."""
        if db.execute("PRAGMA freelist_count").fetchone()[0] == 0:
            return
        db.execute("PRAGMA busy_timeout=0")
        try:
            # executescript: through execute, the pragma frees one page a call.
            db.executescript("PRAGMA incremental_vacuum(1000)")
        except sqlite3.OperationalError as exc:
            if not transient(exc):
                raise
        finally:
            db.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")

    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        # A cancelled caller stops waiting; the thread still finishes the call (each is one
        # transaction), which is what a lost reply from a networked server looks like.
        return await self.submit(fn)

    async def read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn(connection)`` in one read transaction on the reading thread."""
        if self._db is None:
            await self.call(lambda db: None)  # the writer creates the file and its tables
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reads, self._read, fn)

    def _close_writer(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def _close_reader(self) -> None:
        db, self._reader = self._reader, None
        if db is not None:
            db.close()

    async def aclose(self) -> None:
        """Close both connections, after every call already submitted; a later call opens
        them again. (The two threads stay, idle, for the object's life.)"""
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._reads, self._close_reader)
        await loop.run_in_executor(self._writes, self._close_writer)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[float]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error; yields the time once
    the write lock is held, so a lease written in it is not shortened by the wait. The lock
    is taken up front, so two processes never deadlock upgrading a read to a write."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield time.time()
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
