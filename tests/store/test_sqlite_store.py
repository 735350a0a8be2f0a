"""The SQLite store's own: lapsed rows of every table are swept in bounded batches, and a
file written by an older version (its idempotency table only) keeps its keys and gains
the new tables."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from aioworkers.store import JobRecord
from aioworkers.store import sqlite as sqlite_store
from aioworkers.store.sqlite import SqliteStore


def _rows(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return {
            table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("aioworkers_idempotency", "aioworkers_jobs", "aioworkers_state")
        }


async def test_lapsed_rows_are_swept_in_bounded_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "SWEEP_BATCH", 7)
    deletes: list[int] = []
    real_sweep = sqlite_store._sweep

    def counting_sweep(db: sqlite3.Connection) -> None:
        db.set_trace_callback(lambda sql: deletes.append(1) if "DELETE" in sql else None)
        try:
            real_sweep(db)
        finally:
            db.set_trace_callback(None)

    monkeypatch.setattr(sqlite_store, "_sweep", counting_sweep)
    path = tmp_path / "state.db"
    async with SqliteStore(f"sqlite:///{path}") as store:
        for n in range(20):
            await store.claim(f"k{n}", "a", lease=0.05)
            await store.put_job(JobRecord(f"j{n}", "t", "q", "queued"), ttl=0.05)
            await store.mark_cancelled(f"c{n}", ttl=0.05)
            await store.acquire_lease("limit", f"o{n}", limit=100, lease=0.05)
        await store.put_job(JobRecord("kept", "t", "q", "queued"), ttl=60)
        await store.claim_slot("schedule", "kept", ttl=60)
        assert _rows(path) == {
            "aioworkers_idempotency": 20,
            "aioworkers_jobs": 21,
            "aioworkers_state": 41,
        }
        await asyncio.sleep(0.1)  # a real timer: the rows lapse by the file's wall clock
        deletes.clear()
        store._sweep_at = 0.0  # due now: the next write sweeps
        await store.claim("trigger", "a", lease=60)
    assert _rows(path) == {"aioworkers_idempotency": 1, "aioworkers_jobs": 1, "aioworkers_state": 1}
    # 20 + 20 + 40 lapsed rows, at most 7 a statement: more than one batch per table.
    assert len(deletes) >= 3 + 2 + 5


async def test_a_file_of_an_older_version_keeps_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE aioworkers_idempotency "
            "(key TEXT PRIMARY KEY, owner TEXT, expires REAL NOT NULL);"
        )
        db.execute(
            "INSERT INTO aioworkers_idempotency VALUES ('charge:order-1', NULL, ?)",
            (time.time() + 3600,),
        )
    async with SqliteStore(f"sqlite:///{path}") as store:
        assert await store.claim("charge:order-1", "a", lease=60) == "done"
        await store.put_job(JobRecord("j", "t", "q", "queued"), ttl=60)
        assert await store.get_job("j") == JobRecord("j", "t", "q", "queued")
        assert await store.hold_unique("u", "j", ttl=60) is None
