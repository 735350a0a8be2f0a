"""Run one delivery: decode, look the task up, bind arguments, claim its idempotency key,
call the handler, commit the key.

Returns an `Outcome` and never calls the broker: settling is `settle.py`'s job.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from ..brokers.base import Delivery
from ..envelope import Envelope, decode
from ..errors import MAX_FIELD_CHARS, DecodeError, clip
from ..idempotency.base import IdempotencyStore, StoreUnavailable
from ..job import Job, _current, from_epoch_ms
from ..task import Task
from .classify import Deferred, Duplicate, JobCancelled, TooManyDeliveries
from .inflight import Run

log = logging.getLogger("aioworkers")

# A job whose key is busy, or whose store is unreachable, comes back after a pause of
# about a third of the lease (how often a claim is extended), and never more than this.
MAX_DEFER = 5.0
# How much of a `bad_arguments` error is kept (it may quote an argument name of any size).
MAX_BAD_ARGUMENTS = 500


@dataclass(slots=True)
class Outcome:
    """What happened to one delivery: ``error`` is None on success."""

    envelope: Envelope | None
    task: Task[Any, Any] | None
    error: BaseException | None
    duration: float = 0.0  # seconds the handler ran; 0 if it did not run
    started_at: float = 0.0  # when it started, epoch seconds


# What `Executor.prepare` makes of a delivery: its envelope, task and why it can't run.
Prepared = tuple[Envelope | None, Task[Any, Any] | None, DecodeError | None]


class Executor:
    """``store`` keeps the idempotency keys of tasks registered with ``idempotent=True``:
    a claim lasts ``lease`` seconds unless extended, a done key ``ttl`` seconds."""

    def __init__(
        self,
        registry: Mapping[str, Task[Any, Any]],
        *,
        max_message_size: int,
        max_deliveries: int,
        store: IdempotencyStore | None = None,
        lease: float = 30.0,
        ttl: float = 86400.0,
        default_timeout: float | None = None,
    ) -> None:
        self._registry = registry
        self._max_size = max_message_size
        self._max_deliveries = max_deliveries
        self._store = store
        self._lease = lease
        self._ttl = ttl
        self._default_timeout = default_timeout

    def prepare(self, delivery: Delivery) -> Prepared:
        """Decode the body, find its task and bind its arguments; any failure is final."""
        try:
            env = decode(delivery.body, max_size=self._max_size)
        except DecodeError as exc:
            return None, None, exc
        task = self._registry.get(env.task)
        if task is None:
            # Never import or getattr a name from a message: the registry is the allow-list.
            # The name is cut before it is quoted: whatever reads the error reads little.
            name = clip(env.task, MAX_FIELD_CHARS)
            return env, None, DecodeError("unknown_task", f"no task named {name!r}")
        try:
            task.check_arguments(env.args, env.kwargs)
        except TypeError as exc:
            # It may quote an argument name from the message.
            return env, task, DecodeError("bad_arguments", clip(str(exc), MAX_BAD_ARGUMENTS))
        return env, task, None

    async def execute(
        self, delivery: Delivery, run: Run, prepared: Prepared | None = None
    ) -> Outcome:
        """Run ``delivery``; ``prepared`` is what `prepare` returned for it, if known."""
        env, task, invalid = self.prepare(delivery) if prepared is None else prepared
        if invalid is not None or env is None or task is None:
            return Outcome(env, task, invalid)
        if delivery.count > self._max_deliveries:
            # Checked before dispatch: a job that kills its process must not loop forever.
            error = TooManyDeliveries(f"delivered {delivery.count} times")
            return Outcome(env, task, error)
        if run.cancel_requested:
            return Outcome(env, task, JobCancelled())
        if task.idempotent:
            return await self._run_once(delivery, env, task, run)
        return await self._run(delivery, env, task, run)

    async def _run_once(
        self, delivery: Delivery, env: Envelope, task: Task[Any, Any], run: Run
    ) -> Outcome:
        """Run under the job's key: claim it, run, then complete it (success) or release
        it (failure, so a retry can claim it). Never runs without a claim."""
        store = self._store
        if store is None:
            raise RuntimeError(f"task {task.name!r} is idempotent but the worker has no store")
        key = f"{task.name}:{env.key if env.key is not None else env.id}"
        claim = (key, secrets.token_hex(8))  # one owner per run, never reused
        try:
            state = await store.claim(*claim, lease=self._lease)
        except StoreUnavailable as exc:
            # Fail closed: without the store nothing says the key is free.
            return Outcome(env, task, self._deferred(f"idempotency store unavailable: {exc}"))
        except asyncio.CancelledError:
            if not take_back(run):
                raise
            await self._release(claim, run)  # the claim may have been made before the cancel
            return Outcome(env, task, JobCancelled())
        if state == "done":
            return Outcome(env, task, Duplicate(f"key {key!r} is done"))
        if state == "busy":
            return Outcome(env, task, self._deferred(f"key {key!r} is in progress elsewhere"))
        run.claim = claim
        try:
            outcome = await self._run(delivery, env, task, run)
        finally:
            # Dropped before the store hears of it: a heartbeat crossing the completion
            # then reports a claim this run no longer holds, which cancels nothing.
            run.claim = None
        if outcome.error is None:
            # Even if the broker lease was lost meanwhile: the effects happened, and the
            # claim is still ours (complete checks that), so the next delivery is acked
            # as a duplicate instead of running the job again.
            outcome.error = await self._complete(claim, run)
        else:
            # Failed or cancelled: free the key so the retry can claim it.
            await self._release(claim, run)
        return outcome

    async def _complete(self, claim: tuple[str, str], run: Run) -> BaseException | None:
        """Commit the key as done before the job is acked, retrying a store outage while
        the claim's lease lasts; returns the error that keeps the job from being acked."""
        assert self._store is not None
        deadline = time.monotonic() + self._lease
        pause = 0.05
        try:
            while True:
                try:
                    held = await self._store.complete(*claim, ttl=self._ttl)
                except StoreUnavailable as exc:
                    if time.monotonic() + pause > deadline:
                        return self._deferred(f"could not complete key {claim[0]!r}: {exc}")
                    log.warning("could not complete key %r, retrying: %s", claim[0], exc)
                    await anyio.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                if not held:
                    # The handler did run: acking beats running it again.
                    log.warning("key %r lapsed before its job completed it", claim[0])
                return None
        except asyncio.CancelledError:
            if not take_back(run):
                raise
            # Whether the key was committed is unknown: hand the job back, and its next
            # delivery finds the key done, or claims it once this claim has lapsed.
            return JobCancelled()

    async def _release(self, claim: tuple[str, str], run: Run) -> None:
        assert self._store is not None
        try:
            await self._store.release(*claim)
        except StoreUnavailable as exc:
            log.warning("could not release key %r; it lapses with its lease: %s", claim[0], exc)
        except asyncio.CancelledError:
            if not take_back(run):
                raise  # the claim lapses with its lease

    def _deferred(self, why: str) -> Deferred:
        pause = min(self._lease / 3, MAX_DEFER)
        # Jittered, so jobs waiting on one key or one store do not come back in lockstep.
        return Deferred(pause * (0.5 + random.random() / 2), why)

    async def _run(
        self, delivery: Delivery, env: Envelope, task: Task[Any, Any], run: Run
    ) -> Outcome:
        _current.set(
            Job(
                id=env.id,
                task=env.task,
                attempt=env.attempt,
                queue=delivery.queue,
                key=env.key,
                enqueued_at=from_epoch_ms(env.enqueued_at),
                delivery_count=delivery.count,
                headers=env.headers,
            )
        )
        error: BaseException | None = None
        started_at = time.time()
        start = time.perf_counter()
        try:
            timeout = task.policy.timeout or self._default_timeout
            if timeout is None:
                await task.fn(*env.args, **env.kwargs)
            else:
                limit = asyncio.timeout(timeout)
                try:
                    async with limit:
                        await task.fn(*env.args, **env.kwargs)
                except TimeoutError as exc:
                    if not limit.expired():
                        raise  # the handler's own timeout, not the task's
                    raise TimeoutError(f"task {task.name!r} timed out after {timeout}s") from exc
        except asyncio.CancelledError:
            # Ours (shutdown past grace, or lease lost): swallow it so the job is released.
            # Anyone else's, or a second one on top of ours, propagates.
            if not take_back(run):
                raise
            error = JobCancelled()
        except Exception as exc:
            error = exc
        return Outcome(env, task, error, time.perf_counter() - start, started_at)


def take_back(run: Run) -> bool:
    """Take back the cancellation of the current task if it is the runtime's own single
    request (`Run.cancel`); False if it must propagate: a cancel from outside, or a second
    one on top of ours (shutdown cancelling again, e.g. a handler still unwinding the first
    one, or a settle that cannot finish), which nothing may swallow."""
    current = asyncio.current_task()
    if not run.cancel_requested or run.cancel_taken or current is None:
        return False
    if current.cancelling() > 1:
        return False
    run.cancel_taken = True
    current.uncancel()
    return True


def uncancel() -> None:
    """Take back a cancellation of the current task that the runtime asked for itself."""
    current = asyncio.current_task()
    if current is not None:
        current.uncancel()
