"""What the runtime tells the state store about a job: its cancel mark read before it
starts, and, for a task with results (``result_ttl``), its record at start and at the end.

Each kind of call is coalesced (`Coalesce`): the calls made by the jobs started in one turn
of the event loop (a fetched batch) go to the store as one round trip. A task without
results pays one coalesced cancel-mark read per batch, and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import orjson

from ..brokers.base import Delivery
from ..envelope import Envelope, peek_id
from ..errors import printable, redact
from ..store.base import FINAL, JobFinish, JobRecord, JobStatus, JobUpdate, Store, StoreUnavailable
from .backoff import backoff
from .clock import Clock
from .failure import MAX_ERROR_CHARS, describe, error_traceback
from .outcome import (
    CANCELLED,
    DUPLICATE,
    Ack,
    Dead,
    Decision,
    Defer,
    Outcome,
    OutcomeName,
    Release,
    RetryLater,
    Snoozed,
)

log = logging.getLogger("aioworkers")

I = TypeVar("I")  # noqa: E741 (an item)
O = TypeVar("O")  # noqa: E741 (its answer)

# A store write at the end of a job is retried with pauses of at most this long.
MAX_PAUSE = 1.0
# Ids found cancelled at fetch time and not started yet (a job handed back at shutdown
# leaves its id here): past this many the oldest are forgotten (their marks stay).
MAX_SCREENED = 10_000


def alias(task: str, key: str) -> str:
    """The record id under which an idempotent task's result is kept for its key, so that
    a later job with the same key (acked as a duplicate) answers with it."""
    return f"key:{task}:{key}"


class Recorded(Protocol):
    """What records need of a task (`aioworkers.Task` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def result_ttl(self) -> float | None: ...

    @property
    def idempotent(self) -> bool: ...


# A job of a task with results, fetched: its envelope, delivery and result TTL.
Starting = tuple[Envelope, Delivery, float]


class Unscreened:
    """`Records.started` of a job whose start was not written by `Records.screen_ids`."""


UNSCREENED = Unscreened()


class Coalesce(Generic[I, O]):
    """Calls of ``call(items)`` made in one turn of the event loop, as one call: `one`
    returns a future of the answer for its item (``call`` answers one per item, in
    order). A plain future, not a coroutine: the hot path awaits it with nothing between.
    ``fallback``: the answer every item gets if ``call`` raises ``StoreUnavailable``
    (None: the error is each caller's)."""

    def __init__(
        self,
        call: Callable[[list[I]], Awaitable[Sequence[O]]],
        fallback: Callable[[StoreUnavailable], O] | None = None,
    ) -> None:
        self._call = call
        self._fallback = fallback
        self._items: list[I] = []
        self._answers: list[asyncio.Future[O]] = []
        self._flushes: set[asyncio.Task[None]] = set()

    def one(self, item: I) -> asyncio.Future[O]:
        answer: asyncio.Future[O] = asyncio.get_running_loop().create_future()
        self._items.append(item)
        self._answers.append(answer)
        if len(self._answers) == 1:
            # Runs after the other jobs started in this turn have added theirs.
            flush = asyncio.get_running_loop().create_task(self._flush())
            self._flushes.add(flush)  # the loop holds tasks weakly
            flush.add_done_callback(self._flushes.discard)
        return answer

    async def many(self, items: Sequence[I]) -> list[O]:
        return list(await asyncio.gather(*(self.one(item) for item in items)))

    async def _flush(self) -> None:
        items, answers = self._items, self._answers
        self._items, self._answers = [], []
        try:
            results = list(await self._call(items))
        except StoreUnavailable as exc:
            if self._fallback is None:
                _fail(answers, exc)
            else:
                _answer(answers, [self._fallback(exc)] * len(answers))
        except BaseException as exc:  # each caller sees the error (or the cancel)
            _fail(answers, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            _answer(answers, results)


def _answer(answers: list[asyncio.Future[O]], results: Sequence[O]) -> None:
    for answer, result in zip(answers, results, strict=True):
        if not answer.done():  # a caller cancelled meanwhile
            answer.set_result(result)


def _fail(answers: list[asyncio.Future[O]], exc: BaseException) -> None:
    for answer in answers:
        if not answer.done():
            answer.set_exception(exc)


class Records:
    """The runtime's side of job records and cancel marks, on ``store``."""

    def __init__(self, store: Store, *, lease: float, max_result_size: int, clock: Clock) -> None:
        self._store = store
        self._lease = lease
        self._max_result_size = max_result_size
        self._clock = clock
        self._marks: Coalesce[str, Decision | None] = Coalesce(self._read_marks, _unchecked)
        self._updates: Coalesce[JobUpdate, JobStatus | None] = Coalesce(store.update_jobs)
        self._finishes: Coalesce[JobFinish, JobStatus | None] = Coalesce(store.finish_jobs)
        self._screened: dict[str, None] = {}  # ids with a cancel mark, fetched, not started
        # Ids whose start `screen_ids` wrote, not started yet: (their gate, the TTL).
        self._starts: dict[str, tuple[Decision | None, float]] = {}
        # Set by a worker: an ended job's final record goes with its ack (`finishes`),
        # not in a round trip of its own (`after`).
        self.batched = False

    async def screen(self, deliveries: Sequence[Delivery]) -> None:
        """Read the cancel marks of a fetched batch in one round trip, before its jobs are
        admitted; `screened` then answers for each job without another. Never raises but
        a cancellation: if the store does not answer, the jobs run unchecked."""
        await self.screen_ids([i for i in map(peek_id, (d.body for d in deliveries)) if i])

    async def screen_ids(
        self, ids: list[str], starts: Sequence[Starting] = (), marked: Sequence[str] = ()
    ) -> None:
        """`screen` for the jobs of these ids (their bodies already decoded). ``starts``,
        the fetched jobs of tasks with results: their records' start is written in the
        same round trip (`started` then answers for each, `unstart` takes it back for a
        job handed back unstarted), their marks read again after it. ``marked``: jobs
        whose marks the broker found as it fetched them."""
        self._mark(marked)
        if starts:
            ids = list(dict.fromkeys([*ids, *(env.id for env, _, _ in starts)]))
        if not ids:
            return
        try:
            if starts:
                now = self._clock.time()
                updates = [
                    JobUpdate(env.id, ttl, status="running", attempt=env.attempt, started_at=now)
                    for env, _, ttl in starts
                ]
                # The start first, then the marks (one pipeline on Redis): a cancel that
                # lands between them has found the record running and left a mark.
                befores, found = await asyncio.gather(
                    self._store.update_jobs(updates), self._store.cancelled(ids)
                )
                self._started(starts, befores, found)
            else:
                found = await self._store.cancelled(ids)
        except Exception as exc:
            _unchecked(exc)  # (the starts are written again by `before`)
            return
        self._mark(found)

    def _mark(self, marked: Collection[str]) -> None:
        for job_id in marked:
            self._screened[job_id] = None
        while len(self._screened) > MAX_SCREENED:
            del self._screened[next(iter(self._screened))]

    def _started(
        self,
        starts: Sequence[Starting],
        befores: Sequence[JobStatus | None],
        marked: set[str],
    ) -> None:
        gates = self._starts
        for (env, _, ttl), before in zip(starts, befores, strict=True):
            gate: Decision | None = None
            if before == "cancelled":
                gate = CANCELLED
            elif before in FINAL:
                gate = DUPLICATE
            elif before in ("queued", "delayed"):
                # A cancel of a queued job ends its record at once: none came before this
                # start (one that comes after leaves a mark the lease beat reads).
                gate = None
            elif env.id in marked:  # cancelled while running (a redelivery), or no record
                gate = CANCELLED
            elif before is None:
                continue  # no record (enqueued by name, or expired): `before` puts one
            gates[env.id] = (gate, ttl)
        while len(gates) > MAX_SCREENED:
            del gates[next(iter(gates))]

    def screened(self, job_id: str) -> Decision | None:
        """CANCELLED if `screen` found the job's cancel mark, else None (run it)."""
        if self._screened and job_id in self._screened:
            del self._screened[job_id]
            log.info("job %s was cancelled before it started", job_id)
            return CANCELLED
        return None

    def started(self, job_id: str) -> Decision | Unscreened | None:
        """The gate of a job whose start `screen_ids` wrote, at once (no round trip), or
        `UNSCREENED`: `before` then writes the start."""
        found = self._starts.pop(job_id, None) if self._starts else None
        if found is None:
            return UNSCREENED
        self._screened.pop(job_id, None)
        gate: Decision | None = found[0]
        return gate

    async def unstart(self, job_ids: Sequence[str]) -> None:
        """Jobs whose start `screen_ids` wrote, handed back without starting: their records
        say queued again (best effort: a record left running is corrected when the job
        starts again or ends)."""
        updates = []
        for job_id in job_ids:
            found = self._starts.pop(job_id, None) if self._starts else None
            if found is not None and found[0] is None:
                expect: frozenset[JobStatus] = frozenset({"running"})
                updates.append(JobUpdate(job_id, found[1], status="queued", expect=expect))
        if updates:
            try:
                await self._store.update_jobs(updates)
            except Exception as exc:
                log.warning("%d records of jobs handed back say running: %s", len(updates), exc)

    async def _read_marks(self, ids: list[str]) -> list[Decision | None]:
        marked = await self._store.cancelled(ids)
        return [CANCELLED if job_id in marked else None for job_id in ids]

    def before(
        self, env: Envelope, task: Recorded, delivery: Delivery
    ) -> Awaitable[Decision | None]:
        """The gate before the handler: CANCELLED if the job was cancelled, DUPLICATE if
        its record says it ended already (its ack was lost); None runs it. A store that
        does not answer lets it run (cancel and status are then best effort).

        A task without results awaits one future: its cancel mark, read with those of
        the other jobs started in the same turn."""
        if task.result_ttl is None:
            return self._marks.one(env.id)
        return self._start_checked(env, task, delivery, task.result_ttl)

    async def _start_checked(
        self, env: Envelope, task: Recorded, delivery: Delivery, ttl: float
    ) -> Decision | None:
        try:
            return await self._start(env, task, delivery, ttl)
        except StoreUnavailable as exc:
            _unchecked(exc)
            return None

    async def _start(
        self, env: Envelope, task: Recorded, delivery: Delivery, ttl: float
    ) -> Decision | None:
        now = self._clock.time()
        start = JobUpdate(env.id, ttl, status="running", attempt=env.attempt, started_at=now)
        before = await self._updates.one(start)
        if before == "cancelled":
            return CANCELLED
        if before in FINAL:
            return DUPLICATE
        if before in ("queued", "delayed"):
            # A cancel of a queued job ends its record at once: none came before this start
            # (one that comes after leaves a mark the lease beat reads).
            return None
        marked = await self._marks.one(env.id)  # cancelled while running, or no record
        if marked is not None:
            return marked
        if before is None:
            # Enqueued where the task was not known (by name), or the record expired.
            record = JobRecord(
                env.id,
                env.task,
                delivery.queue,
                "running",
                attempt=env.attempt,
                enqueued_at=env.enqueued_at / 1000,
                started_at=now,
            )
            await self._store.put_jobs([record], ttl=ttl)
        return None

    async def after(self, outcome: Outcome, task: Recorded, delivery: Delivery) -> None:
        """Write the record's change for ``outcome`` before it is settled (so a result
        is stored before its job is acked). A store outage is retried for one lease."""
        assert outcome.envelope is not None
        assert task.result_ttl is not None
        write = self._change(outcome, task, delivery, task.result_ttl)
        if write is None:
            return
        try:
            await backoff(
                write,
                what=f"recording job {outcome.envelope.id}",
                clock=self._clock,
                deadline=self._clock.monotonic() + self._lease,
                retry_on=(StoreUnavailable,),
                cap=MAX_PAUSE,
            )
        except StoreUnavailable as exc:
            log.warning("job %s: its record was not written: %s", outcome.envelope.id, exc)

    def _change(
        self, outcome: Outcome, task: Recorded, delivery: Delivery, ttl: float
    ) -> Callable[[], Awaitable[Any]] | None:
        """The store call that records ``outcome`` (None: nothing to record)."""
        env = outcome.envelope
        assert env is not None
        match outcome.decision:
            case Ack(name=OutcomeName.OK):
                return partial(self._succeeded, outcome, task, delivery, ttl)
            case Ack(name=OutcomeName.CANCELLED):
                return partial(
                    self._finishes.many, [self._finish(outcome, delivery, "cancelled", ttl)]
                )
            case Ack(name=OutcomeName.DUPLICATE):
                if task.idempotent and env.key is not None:
                    return partial(self._copy, outcome, delivery, alias(task.name, env.key), ttl)
                return None
            case Dead():
                return partial(
                    self._finishes.many, [self._finish(outcome, delivery, "failed", ttl)]
                )
            case RetryLater():
                return partial(self._updates.many, [self._update(outcome, "retrying", ttl)])
            case Defer() | Snoozed():
                return partial(self._updates.many, [self._update(outcome, "delayed", ttl)])
            case Release():
                return partial(self._updates.many, [self._update(outcome, "queued", ttl)])
        return None

    def _finish(
        self,
        outcome: Outcome,
        delivery: Delivery,
        status: Any,
        ttl: float,
        job_id: str | None = None,
        result: bytes | None = None,
        result_error: str | None = None,
    ) -> JobFinish:
        env = outcome.envelope
        assert env is not None
        error_type, error, trace = _error_fields(outcome)
        return JobFinish(
            job_id or env.id,
            status,
            ttl,
            self._clock.time(),
            task=env.task,
            queue=delivery.queue,
            attempt=env.attempt,
            error_type=error_type,
            error=error,
            traceback=trace,
            result=result,
            result_error=result_error,
        )

    def _update(self, outcome: Outcome, status: JobStatus, ttl: float) -> JobUpdate:
        env = outcome.envelope
        assert env is not None
        error_type, error, trace = _error_fields(outcome)
        return JobUpdate(
            env.id,
            ttl,
            status=status,
            attempt=env.attempt,
            error_type=error_type,
            error=error,
            traceback=trace,
        )

    async def _succeeded(
        self, outcome: Outcome, task: Recorded, delivery: Delivery, ttl: float
    ) -> None:
        await self._finishes.many(self._success(outcome, task, delivery, ttl))

    def finishes(self, outcome: Outcome, task: Recorded, delivery: Delivery) -> list[JobFinish]:
        """The final records of a job that succeeded, for its ack to carry (`batched`)."""
        assert task.result_ttl is not None
        return self._success(outcome, task, delivery, task.result_ttl)

    def _success(
        self, outcome: Outcome, task: Recorded, delivery: Delivery, ttl: float
    ) -> list[JobFinish]:
        env = outcome.envelope
        assert env is not None
        result, why = self._encode(outcome.value)
        if why is not None:
            log.warning("job %s succeeded, but its result is not stored: %s", env.id, why)
        finishes = [self._finish(outcome, delivery, "succeeded", ttl, None, result, why)]
        if task.idempotent and env.key is not None:
            # Kept under the key too: a later job with this key answers with this result.
            key_id = alias(task.name, env.key)
            finishes.append(self._finish(outcome, delivery, "succeeded", ttl, key_id, result, why))
        return finishes

    async def write(self, finishes: list[JobFinish]) -> None:
        """Write the final records an ack batch carries, before it is sent (a result is
        stored before its job is acked). A store outage is retried for one lease; then
        the jobs are acked all the same (their effects happened), with a warning."""
        deadline = self._clock.monotonic() + self._lease
        call = partial(self._store.finish_jobs, finishes)
        try:
            try:
                await call()
                return
            except StoreUnavailable as exc:
                for job_id in dict.fromkeys(f.id for f in finishes):
                    log.warning("recording job %s failed, retrying: %s", job_id, exc)
            what = f"recording {len(finishes)} ended jobs"
            await backoff(
                call,
                what=what,
                clock=self._clock,
                deadline=deadline,
                retry_on=(StoreUnavailable,),
                cap=MAX_PAUSE,
            )
        except StoreUnavailable as exc:
            for job_id in dict.fromkeys(f.id for f in finishes):
                log.warning("job %s: its record was not written: %s", job_id, exc)
        except Exception:
            log.exception("the records of %d ended jobs were not written", len(finishes))

    async def _copy(self, outcome: Outcome, delivery: Delivery, source: str, ttl: float) -> None:
        """A duplicate of a job that completed its key: it ends as that job did."""
        first = await self._store.get_job(source)
        if first is None or not first.final:
            why = "the job ran before under the same key; its result is not kept"
            finish = self._finish(outcome, delivery, "succeeded", ttl, result_error=why)
        else:
            finish = JobFinish(
                outcome.envelope.id if outcome.envelope is not None else first.id,
                "succeeded" if first.status == "succeeded" else "failed",
                ttl,
                self._clock.time(),
                task=first.task,
                queue=delivery.queue,
                error_type=first.error_type,
                error=first.error,
                traceback=first.traceback,
                result=first.result,
                result_error=first.result_error,
            )
        await self._finishes.one(finish)

    def _encode(self, value: object) -> tuple[bytes | None, str | None]:
        """The result's bytes, or why it cannot be stored (the job succeeded all the same)."""
        try:
            body = orjson.dumps(value)
        except (orjson.JSONEncodeError, TypeError) as exc:
            return None, printable(f"the result is not JSON-serializable: {exc}", MAX_ERROR_CHARS)
        if len(body) > self._max_result_size:
            limit = self._max_result_size
            return None, f"the result is {len(body)} bytes, over max_result_size {limit}"
        return body, None


def _unchecked(exc: Exception) -> None:
    log.warning("jobs run unchecked for cancel marks: the store is unavailable: %s", exc)


def _error_fields(outcome: Outcome) -> tuple[str | None, str | None, str | None]:
    """The error of ``outcome`` as the record keeps it, cut and redacted as in a dead letter
    (or the outcome's detail, when no error was raised: too many deliveries)."""
    error = outcome.error
    if error is None:
        return (None, describe(outcome), None) if outcome.detail else (None, None, None)
    message = printable(redact(str(error), MAX_ERROR_CHARS), None)
    return type(error).__name__, message, error_traceback(error)
