"""One SQLite file used from asyncio, shared by the ``sqlite://`` broker and idempotency
store. Writes run on one thread that owns the writing connection, reads (counts, lists)
on another with a connection of their own: the event loop never waits on the disk or on
another process's lock, and in WAL mode a long read never holds up a write."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial
from types import TracebackType
from typing import Any, TypeVar
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

# A call for a `_Lane`: the function, and the future to answer (none for a call nobody
# waits for); None tells the thread to end.
_Item = tuple[Callable[[], Any], "asyncio.Future[Any] | None"]


class _Lane:
    """One thread that runs calls one at a time, in the order given, and answers each on
    the caller's event loop. A fetch and an ack are one call each, so this hop is paid
    per batch: it skips what ``run_in_executor`` adds to it (a second, thread-safe future
    chained to the asyncio one, a coroutine-function check), a third of its cost. As
    there, a call whose caller was cancelled before it started is skipped, and one under
    way finishes."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], _T]) -> asyncio.Future[_T]:
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._put((fn, future))
        return future

    def post(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` in its turn; nothing waits for it."""
        self._put((fn, None))

    def _put(self, item: _Item) -> None:
        if self._thread is None:
            # The thread holds the queue, not the lane: a lane no longer used ends it.
            self._thread = threading.Thread(
                target=_serve, args=(self._queue,), name=self._name, daemon=True
            )
            self._thread.start()
            weakref.finalize(self, self._queue.put, None)
            _LANES.add(self)
        self._queue.put(item)

    def finish(self) -> None:
        """Let the calls given so far run, then end the thread (at interpreter exit)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()


def _serve(calls: queue.SimpleQueue[_Item | None]) -> None:
    while (item := calls.get()) is not None:
        fn, future = item
        del item  # hold nothing of a finished call while waiting for the next one
        if future is None:
            _run_unanswered(fn)
            continue
        if future.cancelled():
            continue
        ok = True
        try:
            value = fn()
        except BaseException as exc:
            ok, value = False, exc
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to answer
            future.get_loop().call_soon_threadsafe(_answer, future, ok, value)
        del fn, future, value


def _run_unanswered(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:
        log.exception("a SQLite call nobody waits for failed")


def _answer(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


# Daemon threads, so an idle one never holds up exit; but calls already given (a
# cancelled fetch's hand-back, a close) still run before the process ends, as with an
# executor's threads.
_LANES: weakref.WeakSet[_Lane] = weakref.WeakSet()


@atexit.register
def _finish_lanes() -> None:
    for lane in list(_LANES):
        lane.finish()


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
        self._writes = _Lane("aioworkers-sqlite")
        self._reads = _Lane("aioworkers-sqlite-read")

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
        return self._writes.submit(partial(self._write, fn))

    def clean_up(self, fn: Callable[[sqlite3.Connection], None]) -> asyncio.Future[None]:
        """Like `submit`, for work left over by a call that was cancelled: if the file was
        closed meanwhile, it is closed again afterwards."""
        closed = self._closed
        future = self._writes.submit(partial(self._write, fn))
        if closed:
            self._writes.post(self._close_writer)
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
        return await self._reads.submit(partial(self._read, fn))

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
        await self._reads.submit(self._close_reader)
        await self._writes.submit(self._close_writer)


class transaction:  # lower case: used as a function, ``with transaction(db) as now:``
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error; gives the time once
    the write lock is held, so a lease written in it is not shortened by the wait. The lock
    is taken up front, so two processes never deadlock upgrading a read to a write. (A
    class, not a generator: it runs on every fetch and ack.)"""

    __slots__ = ("_db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> float:
        self._db.execute("BEGIN IMMEDIATE")
        return time.time()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            try:
                self._db.execute("COMMIT")
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
