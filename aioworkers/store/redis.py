"""The Redis state store: every operation is one Lua script (or one command), so one atomic
step on the server; the scripts are in `_redis_lua`.

Keys, under the store's prefix ``P`` (default ``aioworkers:idempotency``; on a Redis
broker, ``<broker prefix>:idempotency``):

- ``P:<key>``: an idempotency claim, ``c:<owner>`` while claimed, ``d`` once done;
- ``P|job|<id>``: a job record (a hash); ``P|end|<id>``: its notify list, pushed to when
  the job ends, which waiters block on (BLMOVE onto itself: nothing is consumed, so every
  waiter wakes);
- ``P|cancel|<id>``, ``P|slot|<n>:<name>:<slot>``, ``P|unique|<key>``: strings;
- ``P|lease|<key>``: a sorted set of owners by the server time their lease ends;
- ``P|bucket|<key>``: a token bucket (a hash).

The ``|`` after the prefix keeps these apart from claims, whose keys start ``P:`` and hold
user text. Every key expires: claims and records with their lease or TTL, lease sets with
their last lease, buckets once full again.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Collection, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from ..brokers._redis_io import connect, redis_io
from . import _redis_lua as lua
from ._redis_batch import Pipeliner
from ._wait import wait_final
from .base import (
    Beat,
    ClaimResult,
    JobFinish,
    JobRecord,
    JobStatus,
    JobUpdate,
    StoreUnavailable,
    as_status,
    check_limit,
    check_rate,
    check_times,
)

DEFAULT_PREFIX = "aioworkers:idempotency"
# A waiter blocks this long at most per call, then reads the record again.
WAIT_STEP = 2.0
# BLMOVE's timeout has millisecond resolution, and 0 means forever.
MIN_BLOCK = 0.01

_RESULTS: dict[bytes, ClaimResult] = {b"claimed": "claimed", b"done": "done", b"busy": "busy"}


_PRUNE_ROUNDS = 5  # reads of the worker index a listing makes at most, pruning lapsed ids


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _pairs(fields: dict[str, object]) -> list[str]:
    """Field/value items for HSET, as text (for JSON: a Lua number would lose digits),
    leaving out None values."""
    items: list[str] = []
    for name, value in fields.items():
        if value is not None:
            items += [name, repr(value) if isinstance(value, float) else str(value)]
    return items


def _packed(jobs: list[list[object]], results: list[bytes | None]) -> list[bytes]:
    """A job script's ARGV: the jobs' fields as one JSON argument, then each job's result
    (bytes the store does not read, so not JSON); each argument costs the client more to
    encode than the server to decode."""
    return [orjson.dumps(jobs), *(b"" if result is None else result for result in results)]


def _record_fields(r: JobRecord) -> dict[str, object]:
    return {
        "task": r.task,
        "queue": r.queue,
        "status": r.status,
        "attempt": r.attempt,
        "enqueued_at": r.enqueued_at,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "error_type": r.error_type,
        "error": r.error,
        "traceback": r.traceback,
        "result_error": r.result_error,
    }


def _record(job_id: str, raw: dict[Any, Any]) -> JobRecord | None:
    fields: dict[str, bytes] = {bytes(name).decode(): bytes(value) for name, value in raw.items()}
    status = as_status(fields.get("status"))
    if status is None:
        return None

    def text(name: str) -> str | None:
        value = fields.get(name)
        return None if value is None else value.decode()

    def when(name: str) -> float | None:
        value = fields.get(name)
        return None if value is None else float(value)

    return JobRecord(
        job_id,
        text("task") or "",
        text("queue") or "",
        status,
        int(fields.get("attempt", b"1")),
        when("enqueued_at"),
        when("started_at"),
        when("finished_at"),
        text("error_type"),
        text("error"),
        text("traceback"),
        fields.get("result"),
        text("result_error"),
    )


def _statuses(replies: list[bytes]) -> list[JobStatus | None]:
    return [as_status(reply or None) for reply in replies]


class RedisStore:
    """``redis://[:password@]host[:port][/db][?prefix=aioworkers:idempotency]``

    ``socket_timeout`` (default 5 s) bounds each call. Other query parameters go to
    redis-py; ``rediss://`` uses TLS with certificate verification on. Client errors are
    mapped as the broker's are (`redis_io`): a server that is unreachable, loading, busy
    or read-only is `StoreUnavailable`; a refused permission or credential is a
    `ConfigError` that says what to fix. Needs Redis >= 6.2 (BLMOVE).
    """

    def __init__(self, url: str, *, prefix: str | None = None) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.prefix = prefix or query.pop("prefix", "") or DEFAULT_PREFIX
        query.pop("prefix", None)
        self._host = f"{parts.hostname}:{parts.port or 6379}{parts.path}"
        # Few, quick client-side retries: the runtime retries the job itself, and a call
        # that hangs on a dead server would hold a worker slot.
        retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=2)
        self._redis, self._reply_timeout = connect(url, query, retry=retry)
        register = self._redis.register_script
        self._claim = register(lua.CLAIM)
        self._complete = register(lua.COMPLETE)
        self._release = register(lua.RELEASE)
        self._put_jobs = register(lua.PUT_JOBS)
        self._update_jobs = register(lua.UPDATE_JOBS)
        self._finish_jobs = register(lua.FINISH_JOBS)
        self._mark_cancelled = register(lua.MARK_CANCELLED)
        self._hold_unique = register(lua.HOLD_UNIQUE)
        self._free_unique = register(lua.FREE_UNIQUE)
        self._acquire_lease = register(lua.ACQUIRE_LEASE)
        self._beat = register(lua.BEAT)
        self._release_lease = register(lua.RELEASE_LEASE)
        self._take = register(lua.TAKE)
        self._marks = register(lua.MARKS)
        # Calls made together (a batch's jobs, woken waiters) go out in one round trip.
        self._batch = Pipeliner(self._redis)

    def __repr__(self) -> str:
        return f"<RedisStore {self._host} prefix={self.prefix}>"

    def _io(self, blocking: float = 0.0) -> AbstractAsyncContextManager[None]:
        return redis_io(self._reply_timeout + blocking, StoreUnavailable)

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    def _state(self, kind: str, key: str) -> str:
        return f"{self.prefix}|{kind}|{key}"

    @property
    def _workers(self) -> str:
        return f"{self.prefix}|workers"

    # -- idempotency claims ---------------------------------------------------------------

    async def claim(self, key: str, owner: str, *, lease: float) -> ClaimResult:
        check_times(lease=lease)
        async with self._io():
            got = await self._batch.script(self._claim, [self._key(key)], [owner, _ms(lease)])
        return _RESULTS[got]

    async def extend(
        self, claims: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        return (await self.beat(lease=lease, claims=claims)).lost_claims

    async def complete(self, key: str, owner: str, *, ttl: float) -> bool:
        check_times(ttl=ttl)
        async with self._io():
            done = await self._batch.script(self._complete, [self._key(key)], [owner, _ms(ttl)])
        return bool(done == 1)

    async def release(self, key: str, owner: str) -> bool:
        async with self._io():
            freed = await self._batch.script(self._release, [self._key(key)], [owner])
        return bool(freed == 1)

    # -- job records ----------------------------------------------------------------------

    async def put_jobs(self, records: Sequence[JobRecord], *, ttl: float) -> None:
        check_times(ttl=ttl)
        if not records:
            return
        keys: list[str] = []
        jobs: list[list[object]] = []
        for record in records:
            keys += [self._state("job", record.id), self._state("end", record.id)]
            items = _pairs(_record_fields(record))
            jobs.append(
                [str(_ms(ttl)), str(int(record.final)), items, int(record.result is not None)]
            )
        args = _packed(jobs, [record.result for record in records])
        async with self._io():
            await self._batch.script(self._put_jobs, keys, args)

    async def put_job(self, record: JobRecord, *, ttl: float) -> None:
        await self.put_jobs([record], ttl=ttl)

    async def get_job(self, job_id: str) -> JobRecord | None:
        async with self._io():
            raw: dict[Any, Any] = await self._batch.command("HGETALL", self._state("job", job_id))
        return _record(job_id, raw)

    async def update_jobs(self, updates: Sequence[JobUpdate]) -> list[JobStatus | None]:
        if not updates:
            return []
        keys: list[str] = []
        jobs: list[list[object]] = []
        for u in updates:
            keys.append(self._state("job", u.id))
            expect = "" if u.expect is None else f",{','.join(sorted(u.expect))},"
            items = _pairs(
                {
                    "status": u.status,
                    "attempt": u.attempt,
                    "started_at": u.started_at,
                    "error_type": u.error_type,
                    "error": u.error,
                    "traceback": u.traceback,
                }
            )
            jobs.append([str(_ms(u.ttl)), expect, items])
        async with self._io():
            replies = await self._batch.script(self._update_jobs, keys, [orjson.dumps(jobs)])
        return _statuses(replies)

    async def update_job(self, update: JobUpdate) -> JobStatus | None:
        (before,) = await self.update_jobs([update])
        return before

    async def finish_jobs(self, finishes: Sequence[JobFinish]) -> list[JobStatus | None]:
        if not finishes:
            return []
        keys: list[str] = []
        jobs: list[list[object]] = []
        for f in finishes:
            keys += [self._state("job", f.id), self._state("end", f.id)]
            outcome: dict[str, object] = {
                "error_type": f.error_type,
                "error": f.error,
                "traceback": f.traceback,
                "result_error": f.result_error,
            }
            cleared = [name for name, value in outcome.items() if value is None]
            if f.result is None:
                cleared.append("result")
            ends = {"status": f.status, "finished_at": f.finished_at, "attempt": f.attempt}
            items = _pairs(ends | outcome)
            has_result = int(f.result is not None)
            jobs.append([str(_ms(f.ttl)), f.task, f.queue, cleared, items, has_result])
        args = _packed(jobs, [f.result for f in finishes])
        async with self._io():
            replies = await self._batch.script(self._finish_jobs, keys, args)
        return _statuses(replies)

    async def wait_job(self, job_id: str, *, timeout: float | None) -> JobRecord | None:  # noqa: ASYNC109 (see wait_final)
        notify = self._state("end", job_id)

        async def wake(seconds: float) -> None:
            block = max(seconds, MIN_BLOCK)
            async with self._io(block):
                # Onto itself: the entry stays for every other waiter (and the next read).
                await self._redis.blmove(notify, notify, block, "RIGHT", "LEFT")  # type: ignore[arg-type]

        read = functools.partial(self.get_job, job_id)
        return await wait_final(job_id, read, wake, timeout=timeout, step=WAIT_STEP)

    # -- cancel marks ---------------------------------------------------------------------

    async def mark_cancelled(self, job_id: str, *, ttl: float, known_only: bool = False) -> bool:
        check_times(ttl=ttl)
        kinds = ("job", "end", "cancel")
        keys = [self._state(kind, job_id) for kind in kinds]
        async with self._io():
            args: list[str | int] = [_ms(ttl), repr(time.time()), int(known_only)]
            marked = await self._batch.script(self._mark_cancelled, keys, args)
        return bool(marked == 1)

    def cancel_marks_at(self) -> tuple[str, str]:
        """`CancelMarksAt`: a mark is the key ``P|cancel|<job id>`` on this server."""
        return self._host, self._state("cancel", "")

    async def cancelled(self, job_ids: Collection[str]) -> set[str]:
        if not job_ids:
            return set()
        args = [self._state("cancel", ""), orjson.dumps(list(job_ids))]
        async with self._io():
            marked = await self._batch.script(self._marks, [], args)
        return {bytes(job_id).decode() for job_id in marked}

    # -- the worker registry --------------------------------------------------------------
    # ``P|worker|<id>``: the info, expiring on the server's clock; ``P|workers``: the ids by
    # the time first put (this client's clock: an order, not a deadline), pruned of lapsed
    # ids as they are read.

    async def put_worker(self, worker_id: str, info: str, *, ttl: float) -> None:
        check_times(ttl=ttl)
        async with self._io(), self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._state("worker", worker_id), info, px=_ms(ttl))
            pipe.zadd(self._workers, {worker_id: time.time()}, nx=True)
            await pipe.execute()

    async def live_workers(self, *, limit: int = 1000) -> list[str]:
        if limit <= 0:
            return []
        async with self._io():
            for _ in range(_PRUNE_ROUNDS):
                found: Any = await self._redis.zrange(self._workers, 0, limit - 1)
                ids = [_text(i) for i in found]
                keys = [self._state("worker", i) for i in ids]
                infos = await self._redis.mget(keys) if ids else []
                lapsed = [i for i, info in zip(ids, infos, strict=True) if info is None]
                if lapsed:
                    await self._redis.zrem(self._workers, *lapsed)
                if not lapsed or len(ids) < limit:
                    break
        return [_text(info) for info in infos if info is not None]

    async def forget_worker(self, worker_id: str) -> bool:
        async with self._io(), self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._state("worker", worker_id))
            pipe.zrem(self._workers, worker_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    # -- schedule slots, unique keys ------------------------------------------------------

    async def claim_slot(self, name: str, slot: str, *, ttl: float) -> bool:
        check_times(ttl=ttl)
        key = self._state("slot", f"{len(name)}:{name}:{slot}")
        async with self._io():
            return bool(await self._redis.set(key, b"1", nx=True, px=_ms(ttl)))

    async def hold_unique(self, key: str, job_id: str, *, ttl: float) -> str | None:
        check_times(ttl=ttl)
        async with self._io():
            holder = await self._hold_unique(
                keys=[self._state("unique", key)], args=[job_id, _ms(ttl)]
            )
        return None if holder is None else bytes(holder).decode()

    async def free_unique(self, key: str, job_id: str) -> bool:
        async with self._io():
            freed = await self._batch.script(
                self._free_unique, [self._state("unique", key)], [job_id]
            )
        return bool(freed == 1)

    # -- limit leases ---------------------------------------------------------------------

    async def acquire_lease(self, key: str, owner: str, *, limit: int, lease: float) -> bool:
        check_limit(limit)
        check_times(lease=lease)
        async with self._io():
            got = await self._acquire_lease(
                keys=[self._state("lease", key)], args=[owner, limit, _ms(lease)]
            )
        return bool(got == 1)

    async def extend_leases(
        self, held: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        return (await self.beat(lease=lease, leases=held)).lost_leases

    async def release_lease(self, key: str, owner: str) -> bool:
        async with self._io():
            freed = await self._batch.script(
                self._release_lease, [self._state("lease", key)], [owner]
            )
        return bool(freed == 1)

    # -- token buckets --------------------------------------------------------------------

    async def take(self, key: str, *, rate: int, per: float, now: float | None = None) -> float:
        check_rate(rate, per)
        at = "" if now is None else repr(float(now))
        async with self._io():
            wait = await self._batch.script(
                self._take, [self._state("bucket", key)], [rate, repr(per), at]
            )
        return max(0.0, float(wait))

    # -- the heartbeat --------------------------------------------------------------------

    async def beat(
        self,
        *,
        lease: float,
        claims: Sequence[tuple[str, str]] = (),
        leases: Sequence[tuple[str, str]] = (),
        watch: Collection[str] = (),
    ) -> Beat:
        check_times(lease=lease)
        ids = list(watch)
        if not (claims or leases or ids):
            return Beat()
        keys = [self._key(key) for key, _ in claims]
        keys += [self._state("lease", key) for key, _ in leases]
        keys += [self._state("cancel", job_id) for job_id in ids]
        args: list[Any] = [_ms(lease), len(claims), len(leases)]
        args += [owner for _, owner in claims] + [owner for _, owner in leases]
        # One script, so one round trip (a pipeline of scripts costs a SCRIPT EXISTS more).
        async with self._io():
            kept_claims, kept_leases, marks = await self._batch.script(self._beat, keys, args)
        return Beat(
            [c for c, ok in zip(claims, kept_claims, strict=True) if ok != 1],
            [h for h, ok in zip(leases, kept_leases, strict=True) if ok != 1],
            {i for i, mark in zip(ids, marks, strict=True) if mark == 1},
        )

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
