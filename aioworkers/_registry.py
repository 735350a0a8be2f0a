"""The worker registry: each running worker keeps a record of itself fresh in the app's
state store, and the dashboard lists the live ones. A worker that stops beating (killed,
partitioned) is forgotten once its record lapses, `TTL_BEATS` beats after its last.

The records are JSON kept by the store's registry operations (`Store.put_worker`,
`live_workers`, `forget_worker`): every store has them, so every store lists workers.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

import anyio
import orjson

from ._runtime.clock import Clock
from .store import StoreUnavailable
from .store.base import IdempotencyStore, Store

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


class Registry:
    """The workers kept in one `Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def beat(self, info: WorkerInfo, *, ttl: float) -> None:
        """Write ``info``, kept ``ttl`` seconds unless beaten again."""
        await self.store.put_worker(info.id, info.dumps().decode(), ttl=ttl)

    async def forget(self, worker_id: str) -> None:
        await self.store.forget_worker(worker_id)

    async def workers(self) -> list[WorkerInfo]:
        """The live workers, oldest first (at most `MAX_WORKERS`); records this version
        cannot read are left out."""
        found = [
            info
            for raw in await self.store.live_workers(limit=MAX_WORKERS)
            if (info := WorkerInfo.loads(raw)) is not None
        ]
        return sorted(found, key=_started)


def registry_for(store: IdempotencyStore | None) -> Registry | None:
    """The registry kept in ``store``, or None (no store, or an idempotency store alone)."""
    return Registry(store) if isinstance(store, Store) else None


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
