"""The worker registry: each running worker keeps a record of itself fresh in the app's
state store, and the dashboard lists the live ones. A worker that stops beating (killed,
partitioned) is forgotten once its record lapses, `TTL_BEATS` beats after its last.

The `Store` protocol has no listing primitive, so this module keeps the records beside
the store's own state, through the store's connection: a Redis string per worker (expiring
on the server's clock) and an index set; a SQLite table; a dict per `MemoryStore`.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import anyio
import orjson

from ._runtime.clock import Clock
from ._sqlite import transaction
from .store import MemoryStore, StoreUnavailable
from .store.base import IdempotencyStore

log = logging.getLogger("aioworkers")

BEAT_EVERY = 5.0  # seconds between two beats of a worker
TTL_BEATS = 3  # a record lapses this many beats after the last one
MAX_WORKERS = 1000  # listed at most (a bound on what one page reads)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One worker as it last reported itself. Times are epoch seconds; the counts are of
    jobs since the worker started (``outcomes``: by outcome, ``ok``, ``throttled``, ...)."""

    id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    in_flight: int
    jobs_started: int
    jobs_ok: int
    jobs_failed: int
    started_at: float
    beat_at: float
    state: str
    # Added later: a record left by an older version has neither (then 0 and {}).
    jobs_throttled: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def dumps(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: bytes | str) -> WorkerInfo | None:
        """The record, or None for one this version cannot read (left by another). Fields
        a newer version added are ignored; those this one added may be missing."""
        try:
            doc = orjson.loads(raw)
            known = {k: v for k, v in doc.items() if k in _FIELDS}
            return cls(**{**known, "queues": tuple(doc["queues"])})
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
            return None


_FIELDS = frozenset(f.name for f in fields(WorkerInfo))


class Registry(Protocol):
    async def beat(self, info: WorkerInfo, *, ttl: float) -> None:
        """Write ``info``, kept ``ttl`` seconds unless beaten again."""
        ...

    async def forget(self, worker_id: str) -> None: ...

    async def workers(self) -> list[WorkerInfo]:
        """The live workers, oldest first (at most `MAX_WORKERS`)."""
        ...


class MemoryRegistry:
    """The workers of this process that share one `MemoryStore`."""

    def __init__(self) -> None:
        self._records: dict[str, tuple[WorkerInfo, float]] = {}

    async def beat(self, info: WorkerInfo, *, ttl: float) -> None:
        self._records[info.id] = (info, time.monotonic() + ttl)

    async def forget(self, worker_id: str) -> None:
        self._records.pop(worker_id, None)

    async def workers(self) -> list[WorkerInfo]:
        now = time.monotonic()
        self._records = {k: v for k, v in self._records.items() if v[1] > now}
        found = sorted((info for info, _ in self._records.values()), key=_started)
        return found[:MAX_WORKERS]


class RedisRegistry:
    """``P|worker|<id>``: the record, expiring on the server; ``P|workers``: the ids by
    start time, pruned of lapsed ids as they are read."""

    def __init__(self, store: Any) -> None:
        self._store = store  # a RedisStore: its connection and error mapping are reused
        self._index = f"{store.prefix}|workers"

    def _key(self, worker_id: str) -> str:
        return f"{self._store.prefix}|worker|{worker_id}"

    async def beat(self, info: WorkerInfo, *, ttl: float) -> None:
        redis = self._store._redis
        async with self._store._io(), redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(info.id), info.dumps(), px=max(1, round(ttl * 1000)))
            pipe.zadd(self._index, {info.id: info.started_at}, nx=True)
            await pipe.execute()

    async def forget(self, worker_id: str) -> None:
        redis = self._store._redis
        async with self._store._io(), redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(worker_id))
            pipe.zrem(self._index, worker_id)
            await pipe.execute()

    async def workers(self) -> list[WorkerInfo]:
        redis = self._store._redis
        async with self._store._io():
            ids = [bytes(i).decode() for i in await redis.zrange(self._index, 0, MAX_WORKERS - 1)]
            raws = await redis.mget([self._key(i) for i in ids]) if ids else []
            lapsed = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
            if lapsed:
                await redis.zrem(self._index, *lapsed)
        return [info for raw in raws if raw is not None and (info := WorkerInfo.loads(raw))]


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS aioworkers_workers "
    "(id TEXT PRIMARY KEY, started REAL NOT NULL, info TEXT NOT NULL, expires REAL NOT NULL)"
)


class SqliteRegistry:
    """The ``aioworkers_workers`` table of the store's file."""

    def __init__(self, store: Any) -> None:
        self._file = store._file  # a SqliteStore's file: one writing thread, errors mapped

    async def _write(self, fn: Callable[[sqlite3.Connection, float], Any]) -> Any:
        def write(db: sqlite3.Connection) -> Any:
            db.execute(_SCHEMA)
            with transaction(db) as now:
                return fn(db, now)

        return await self._file.call(write)

    async def beat(self, info: WorkerInfo, *, ttl: float) -> None:
        def beat(db: sqlite3.Connection, now: float) -> None:
            db.execute(
                "INSERT OR REPLACE INTO aioworkers_workers VALUES (?, ?, ?, ?)",
                (info.id, info.started_at, info.dumps().decode(), now + ttl),
            )

        await self._write(beat)

    async def forget(self, worker_id: str) -> None:
        await self._write(
            lambda db, now: db.execute("DELETE FROM aioworkers_workers WHERE id = ?", (worker_id,))
        )

    async def workers(self) -> list[WorkerInfo]:
        def read(db: sqlite3.Connection, now: float) -> list[str]:
            db.execute("DELETE FROM aioworkers_workers WHERE expires <= ?", (now,))
            rows = db.execute(
                "SELECT info FROM aioworkers_workers ORDER BY started LIMIT ?", (MAX_WORKERS,)
            )
            return [row[0] for row in rows]

        raws: list[str] = await self._write(read)
        return [info for raw in raws if (info := WorkerInfo.loads(raw))]


_MEMORY: weakref.WeakKeyDictionary[MemoryStore, MemoryRegistry] = weakref.WeakKeyDictionary()


def registry_for(store: IdempotencyStore | None) -> Registry | None:
    """The registry kept in ``store``, or None (no store, or one this module cannot list)."""
    if isinstance(store, MemoryStore):
        return _MEMORY.setdefault(store, MemoryRegistry())
    kind = type(store).__name__
    if kind == "RedisStore":  # by name: importing it would import redis
        return RedisRegistry(store)
    if kind == "SqliteStore":
        return SqliteRegistry(store)
    return None


def _started(info: WorkerInfo) -> float:
    return info.started_at


class Reporter(Protocol):
    """What a worker shows of itself (`Worker` is one)."""

    queues: list[str]
    concurrency: int
    state: str

    @property
    def in_flight(self) -> int: ...

    @property
    def jobs_started(self) -> int: ...

    @property
    def counts(self) -> dict[str, int]: ...


async def keep_registered(
    worker: Reporter,
    store: Callable[[], IdempotencyStore | None],
    clock: Clock,
    *,
    every: float = BEAT_EVERY,
) -> None:
    """Beat ``worker``'s record every ``every`` seconds until cancelled, then forget it.
    A failed beat is logged and tried again next time: the registry never stops a worker."""
    try:
        registry = registry_for(store())
    except Exception:  # no store on this broker (amqp, sqs): nothing to list workers in
        return
    if registry is None:
        return
    worker_id = uuid.uuid4().hex[:12]
    info = _Snapshot(worker_id, clock.time())
    try:
        while True:
            await _quietly(registry.beat(info.of(worker, clock.time()), ttl=every * TTL_BEATS))
            await clock.sleep(every)
    finally:
        # Shielded and bounded: the worker is stopping, and its record would lapse anyway.
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
            await _quietly(registry.forget(worker_id))


async def _quietly(call: Awaitable[None]) -> None:
    try:
        await call
    except (StoreUnavailable, OSError) as exc:
        log.debug("worker registry: %s: %s", type(exc).__name__, exc)
    except Exception as exc:
        log.warning("worker registry: %s: %s", type(exc).__name__, exc)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    id: str
    started_at: float

    def of(self, worker: Reporter, now: float) -> WorkerInfo:
        counts = worker.counts
        return WorkerInfo(
            id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=tuple(worker.queues),
            concurrency=worker.concurrency,
            in_flight=worker.in_flight,
            jobs_started=worker.jobs_started,
            jobs_ok=counts.get("ok", 0),
            jobs_failed=counts.get("dead", 0),
            started_at=self.started_at,
            beat_at=now,
            state=worker.state,
            jobs_throttled=counts.get("throttled", 0),
            outcomes=dict(counts),
        )


__all__ = [
    "BEAT_EVERY",
    "TTL_BEATS",
    "Registry",
    "WorkerInfo",
    "keep_registered",
    "registry_for",
]
