"""The SQLite idempotency store: keys in a table of a database file, shared by the
processes of one machine (by default the ``sqlite://`` broker's own file).

A row holds the owner while claimed and NULL once done, with the wall-clock time it
expires; a lapsed row counts as absent. Each operation is one transaction.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from .._sqlite import SqliteFile, parse_url, seconds_option, transaction
from ..errors import ConfigError
from .base import ClaimResult, StoreUnavailable, check_times

_SCHEMA = """
CREATE TABLE IF NOT EXISTS aioworkers_idempotency (
    key TEXT PRIMARY KEY,
    owner TEXT,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS aioworkers_idempotency_expires ON aioworkers_idempotency (expires);
"""

_HELD = "key = ? AND owner = ? AND expires > ?"
_RELEASE = f"DELETE FROM aioworkers_idempotency WHERE {_HELD}"
_COMPLETE = f"UPDATE aioworkers_idempotency SET owner = NULL, expires = ? WHERE {_HELD}"

# Lapsed rows nobody looks up again are swept this often (seconds), in bounded batches so
# that the sweep never holds the file's write lock long.
SWEEP_EVERY = 60.0
SWEEP_BATCH = 1000
_SWEEP = (
    "DELETE FROM aioworkers_idempotency WHERE rowid IN "
    "(SELECT rowid FROM aioworkers_idempotency WHERE expires <= ? LIMIT ?)"
)


class SqliteStore:
    """``sqlite:///path/to/jobs.db[?timeout=5]``: keys in the ``aioworkers_idempotency``
    table. ``timeout``: how long a call waits for another process's write lock before it
    fails as `StoreUnavailable` (the runtime then defers the job)."""

    def __init__(self, url: str) -> None:
        path, query = parse_url(url, "the idempotency store URL")
        busy_timeout = seconds_option(query, "timeout", 5.0, low=0.001)
        query.pop("poll", None)  # the broker's option, when the store shares its URL
        if query:
            raise ConfigError(
                f"sqlite:// store has no option {sorted(query)[0]!r} (known: timeout)"
            )
        self.path = path
        self._file = SqliteFile(
            path, schema=_SCHEMA, busy_timeout=busy_timeout, unavailable=StoreUnavailable
        )
        self._sweep_at = 0.0  # the first claim sweeps: short-lived processes sweep too

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path}>"

    async def claim(self, key: str, owner: str, *, lease: float) -> ClaimResult:
        check_times(lease=lease)
        sweep = time.monotonic() > self._sweep_at
        if sweep:
            self._sweep_at = time.monotonic() + SWEEP_EVERY

        def claim(db: sqlite3.Connection) -> ClaimResult:
            # Every lapsed key, a batch per transaction so that others write in between.
            more = sweep
            while more:
                with transaction(db) as now:
                    more = db.execute(_SWEEP, (now, SWEEP_BATCH)).rowcount == SWEEP_BATCH
            with transaction(db) as now:
                row = db.execute(
                    "SELECT owner FROM aioworkers_idempotency WHERE key = ? AND expires > ?",
                    (key, now),
                ).fetchone()
                if row is not None:
                    return "done" if row[0] is None else "busy"
                db.execute(
                    "INSERT OR REPLACE INTO aioworkers_idempotency (key, owner, expires) "
                    "VALUES (?, ?, ?)",
                    (key, owner, now + lease),
                )
                return "claimed"

        return await self._file.call(claim)

    async def extend(
        self, claims: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        check_times(lease=lease)
        if not claims:
            return []

        def extend(db: sqlite3.Connection) -> list[tuple[str, str]]:
            with transaction(db) as now:
                return [
                    (key, owner)
                    for key, owner in claims
                    if db.execute(
                        f"UPDATE aioworkers_idempotency SET expires = ? WHERE {_HELD}",
                        (now + lease, key, owner, now),
                    ).rowcount
                    == 0
                ]

        return await self._file.call(extend)

    async def complete(self, key: str, owner: str, *, ttl: float) -> bool:
        check_times(ttl=ttl)

        def complete(db: sqlite3.Connection) -> bool:
            with transaction(db) as now:
                return bool(db.execute(_COMPLETE, (now + ttl, key, owner, now)).rowcount)

        return await self._file.call(complete)

    async def release(self, key: str, owner: str) -> bool:
        def release(db: sqlite3.Connection) -> bool:
            with transaction(db) as now:
                return bool(db.execute(_RELEASE, (key, owner, now)).rowcount)

        return await self._file.call(release)

    async def aclose(self) -> None:
        await self._file.aclose()

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
