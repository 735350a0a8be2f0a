"""The in-memory state store: the reference semantics, for tests and one process.

Every operation runs without an await between its read and its write, so each is atomic
among the tasks of the event loop. Expired entries are dropped when looked up, and all of
a table's expired entries whenever it has doubled since its last sweep, which keeps the
cost per write constant.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .._runtime.clock import SYSTEM_CLOCK, Clock
from ._wait import Waiters, wait_final
from .base import (
    FINAL,
    Beat,
    ClaimResult,
    JobFinish,
    JobRecord,
    JobStatus,
    JobUpdate,
    check_expect,
    check_limit,
    check_rate,
    check_times,
)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

SWEEP_MIN = 1024  # a table is swept once it holds this many entries, then when it doubles
WAIT_STEP = 1.0  # a wait re-reads the record this often even without a wake-up


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    expires: float


class _Table(Generic[K, V]):
    """A dict whose entries lapse at their ``expires`` (monotonic seconds of ``now``)."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._entries: dict[K, _Entry[V]] = {}
        self._sweep_at = SWEEP_MIN

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, key: K) -> _Entry[V] | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= self._now():
            del self._entries[key]
            return None
        return entry

    def get(self, key: K) -> V | None:
        entry = self.entry(key)
        return None if entry is None else entry.value

    def put(self, key: K, value: V, seconds: float) -> None:
        self._entries[key] = _Entry(value, self._now() + seconds)
        if len(self._entries) >= self._sweep_at:
            now = self._now()
            self._entries = {k: e for k, e in self._entries.items() if e.expires > now}
            self._sweep_at = max(SWEEP_MIN, 2 * len(self._entries))

    def pop(self, key: K) -> None:
        self._entries.pop(key, None)


class _MonotonicClock:
    """A `Clock` over a bare monotonic callable (what ``MemoryStore(clock=...)`` took
    before it took a `Clock`): sleeps are real."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._offset = time.time() - monotonic()

    async def sleep(self, seconds: float) -> None:
        await SYSTEM_CLOCK.sleep(seconds)

    def monotonic(self) -> float:
        return self._monotonic()

    def time(self) -> float:
        return self._monotonic() + self._offset


class MemoryStore:
    """The state shared by every worker of the process that uses this instance.

    ``clock``: a `Clock` (``aioworkers.testing.FakeClock`` in tests, to lapse leases and
    TTLs on demand), or a bare monotonic callable.
    """

    def __init__(self, *, clock: Clock | Callable[[], float] = SYSTEM_CLOCK) -> None:
        self._clock: Clock = _MonotonicClock(clock) if callable(clock) else clock
        now = self._clock.monotonic
        # Claims: the owner while claimed, None once done.
        self._claims: _Table[str, str | None] = _Table(now)
        self._jobs: _Table[str, JobRecord] = _Table(now)
        # Cancel marks, schedule slots and unique keys: (kind, key) -> a value.
        self._marks: _Table[tuple[str, str], str] = _Table(now)
        self._leases: _Table[str, dict[str, float]] = _Table(now)
        self._buckets: _Table[str, tuple[float, float]] = _Table(now)
        self._waiters = Waiters(self._clock)
        # Worker id -> (info, expiry); in the order first put (an update keeps its place).
        self._workers: dict[str, tuple[str, float]] = {}

    def __repr__(self) -> str:
        return f"<MemoryStore keys={len(self._claims)} jobs={len(self._jobs)}>"

    # -- idempotency claims ---------------------------------------------------------------

    async def claim(self, key: str, owner: str, *, lease: float) -> ClaimResult:
        check_times(lease=lease)
        entry = self._claims.entry(key)
        if entry is None:
            self._claims.put(key, owner, lease)
            return "claimed"
        return "done" if entry.value is None else "busy"

    def _held(self, key: str, owner: str) -> bool:
        entry = self._claims.entry(key)
        return entry is not None and entry.value == owner

    async def extend(
        self, claims: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        check_times(lease=lease)
        lost = []
        for key, owner in claims:
            if self._held(key, owner):
                self._claims.put(key, owner, lease)
            else:
                lost.append((key, owner))
        return lost

    async def complete(self, key: str, owner: str, *, ttl: float) -> bool:
        check_times(ttl=ttl)
        if not self._held(key, owner):
            return False
        self._claims.put(key, None, ttl)
        return True

    async def release(self, key: str, owner: str) -> bool:
        if not self._held(key, owner):
            return False
        self._claims.pop(key)
        return True

    # -- job records ----------------------------------------------------------------------

    async def put_jobs(self, records: Sequence[JobRecord], *, ttl: float) -> None:
        check_times(ttl=ttl)
        for record in records:
            self._jobs.put(record.id, record, ttl)
            if record.final:
                self._waiters.wake(record.id)

    async def put_job(self, record: JobRecord, *, ttl: float) -> None:
        await self.put_jobs([record], ttl=ttl)

    async def get_job(self, job_id: str) -> JobRecord | None:
        return self._jobs.get(job_id)

    async def update_jobs(self, updates: Sequence[JobUpdate]) -> list[JobStatus | None]:
        before: list[JobStatus | None] = []
        for update in updates:
            record = self._jobs.get(update.id)
            before.append(None if record is None else record.status)
            if record is not None and check_expect(update, record.status):
                changes = _changes(update, ("status", "attempt", "started_at"))
                changes |= _changes(update, ("error_type", "error", "traceback"))
                self._jobs.put(update.id, dataclasses.replace(record, **changes), update.ttl)
        return before

    async def update_job(self, update: JobUpdate) -> JobStatus | None:
        (before,) = await self.update_jobs([update])
        return before

    async def finish_jobs(self, finishes: Sequence[JobFinish]) -> list[JobStatus | None]:
        before: list[JobStatus | None] = []
        for finish in finishes:
            record = self._jobs.get(finish.id)
            before.append(None if record is None else record.status)
            if record is None or record.status not in FINAL:
                self._jobs.put(finish.id, finished(record, finish), finish.ttl)
                self._waiters.wake(finish.id)
        return before

    async def wait_job(self, job_id: str, *, timeout: float | None) -> JobRecord | None:  # noqa: ASYNC109 (see wait_final)
        async def wake(seconds: float) -> None:
            await self._waiters.wait(job_id, seconds)

        read = functools.partial(self.get_job, job_id)
        return await wait_final(
            job_id, read, wake, timeout=timeout, step=WAIT_STEP, clock=self._clock
        )

    # -- cancel marks ---------------------------------------------------------------------

    async def mark_cancelled(self, job_id: str, *, ttl: float, known_only: bool = False) -> bool:
        check_times(ttl=ttl)
        entry = self._jobs.entry(job_id)
        if (entry is None and known_only) or (entry is not None and entry.value.final):
            return False
        self._marks.put(("cancel", job_id), "", ttl)
        if entry is not None and entry.value.status != "running":
            left = entry.expires - self._clock.monotonic()
            ended = JobFinish(job_id, "cancelled", ttl=left, finished_at=self._clock.time())
            self._jobs.put(job_id, finished(entry.value, ended), left)
            self._waiters.wake(job_id)
        return True

    async def cancelled(self, job_ids: Collection[str]) -> set[str]:
        return {job_id for job_id in job_ids if self._marks.get(("cancel", job_id)) is not None}

    # -- schedule slots, unique keys ------------------------------------------------------

    async def claim_slot(self, name: str, slot: str, *, ttl: float) -> bool:
        check_times(ttl=ttl)
        key = ("slot", f"{len(name)}:{name}:{slot}")
        if self._marks.get(key) is not None:
            return False
        self._marks.put(key, "", ttl)
        return True

    async def hold_unique(self, key: str, job_id: str, *, ttl: float) -> str | None:
        check_times(ttl=ttl)
        holder = self._marks.get(("unique", key))
        if holder is not None and holder != job_id:
            return holder
        self._marks.put(("unique", key), job_id, ttl)
        return None

    async def free_unique(self, key: str, job_id: str) -> bool:
        if self._marks.get(("unique", key)) != job_id:
            return False
        self._marks.pop(("unique", key))
        return True

    # -- limit leases ---------------------------------------------------------------------

    def _holders(self, key: str) -> dict[str, float]:
        """The live leases of ``key``, owner -> expiry (lapsed ones dropped)."""
        holders = self._leases.get(key) or {}
        now = self._clock.monotonic()
        return {owner: until for owner, until in holders.items() if until > now}

    def _keep(self, key: str, holders: dict[str, float]) -> None:
        if holders:
            self._leases.put(key, holders, max(holders.values()) - self._clock.monotonic())
        else:
            self._leases.pop(key)

    async def acquire_lease(self, key: str, owner: str, *, limit: int, lease: float) -> bool:
        check_limit(limit)
        check_times(lease=lease)
        holders = self._holders(key)
        if owner not in holders and len(holders) >= limit:
            self._keep(key, holders)
            return False
        holders[owner] = self._clock.monotonic() + lease
        self._keep(key, holders)
        return True

    async def extend_leases(
        self, held: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        check_times(lease=lease)
        lost = []
        for key, owner in held:
            holders = self._holders(key)
            if owner in holders:
                holders[owner] = self._clock.monotonic() + lease
            else:
                lost.append((key, owner))
            self._keep(key, holders)
        return lost

    async def release_lease(self, key: str, owner: str) -> bool:
        holders = self._holders(key)
        held = holders.pop(owner, None) is not None
        self._keep(key, holders)
        return held

    # -- token buckets --------------------------------------------------------------------

    async def take(self, key: str, *, rate: int, per: float, now: float | None = None) -> float:
        check_rate(rate, per)
        at = self._clock.time() if now is None else now
        tokens, then = self._buckets.get(key) or (float(rate), at)
        tokens = min(float(rate), tokens + max(0.0, at - then) * rate / per)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) * per / rate
        # Idle for ``per`` seconds, a bucket is full again: the same as no bucket.
        self._buckets.put(key, (tokens, at), per)
        return wait

    # -- the worker registry --------------------------------------------------------------

    async def put_worker(self, worker_id: str, info: str, *, ttl: float) -> None:
        check_times(ttl=ttl)
        self._live_workers()  # a lapsed record goes first: back, it counts as new
        self._workers[worker_id] = (info, self._clock.monotonic() + ttl)

    async def live_workers(self, *, limit: int = 1000) -> list[str]:
        return [info for info, _ in itertools.islice(self._live_workers(), max(limit, 0))]

    async def forget_worker(self, worker_id: str) -> bool:
        return self._workers.pop(worker_id, None) is not None

    def _live_workers(self) -> Iterable[tuple[str, float]]:
        now = self._clock.monotonic()
        lapsed = [k for k, (_, expires) in self._workers.items() if expires <= now]
        for worker_id in lapsed:
            del self._workers[worker_id]
        return self._workers.values()

    # -- the heartbeat --------------------------------------------------------------------

    async def beat(
        self,
        *,
        lease: float,
        claims: Sequence[tuple[str, str]] = (),
        leases: Sequence[tuple[str, str]] = (),
        watch: Collection[str] = (),
    ) -> Beat:
        return Beat(
            await self.extend(claims, lease=lease) if claims else [],
            await self.extend_leases(leases, lease=lease) if leases else [],
            await self.cancelled(watch) if watch else set(),
        )

    async def aclose(self) -> None:
        """Nothing to close; the state stays, so a closed app can be reopened in-process."""

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _changes(update: JobUpdate, names: tuple[str, ...]) -> dict[str, Any]:
    """The fields of ``update`` among ``names`` that it sets (not None)."""
    values = {name: getattr(update, name) for name in names}
    return {name: value for name, value in values.items() if value is not None}


def finished(record: JobRecord | None, finish: JobFinish) -> JobRecord:
    """``record`` as ``finish`` leaves it (created from it if None)."""
    base = record or JobRecord(finish.id, finish.task, finish.queue, finish.status)
    return dataclasses.replace(
        base,
        status=finish.status,
        attempt=base.attempt if finish.attempt is None else finish.attempt,
        finished_at=finish.finished_at,
        error_type=finish.error_type,
        error=finish.error,
        traceback=finish.traceback,
        result=finish.result,
        result_error=finish.result_error,
    )
