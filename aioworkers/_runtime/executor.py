"""Run one delivery: decode, look the task up, bind arguments, pass the policy's gates,
claim its idempotency key, call the handler, commit the key.

Returns an `Outcome` (a value, with the policy's decision in it) and never calls the
broker: settling is `settle.py`'s job.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

from ..brokers.base import Delivery
from ..envelope import Envelope, decode
from ..errors import MAX_FIELD_CHARS, DecodeError, clip
from ..idempotency.base import IdempotencyStore, StoreUnavailable
from ..job import Pending, _current, current_job
from ..store.base import Store
from . import handlers, limits, policy
from .backoff import backoff
from .clock import SYSTEM_CLOCK, Clock
from .completion import Completion, after_run, completion_var
from .foreign import Foreign, foreign_for
from .handlers import Handler, Middleware
from .inflight import Run
from .limits import Limits
from .outcome import ACK, CANCELLED, RELEASE, Decision, Outcome, TaskInfo
from .policy import DEFAULT_POLICY, MAX_DELIVERIES, Policy
from .records import Records, Unscreened
from .threads import SyncThreads

log = logging.getLogger("aioworkers")

# How much of a `bad_arguments` error is kept (it may quote an argument name of any size).
MAX_BAD_ARGUMENTS = 500
# A store that fails to commit a key is retried with pauses of at most this long.
MAX_COMPLETE_PAUSE = 1.0


class Runnable(TaskInfo, Protocol):
    """What the executor needs of a registered task (`aioworkers.Task` is one)."""

    @property
    def policy(self) -> Policy: ...

    @property
    def idempotent(self) -> bool: ...

    @property
    def fn(self) -> Callable[..., Coroutine[Any, Any, Any]]: ...

    @property
    def result_ttl(self) -> float | None: ...

    @property
    def handler(self) -> Handler | None: ...

    @property
    def limits(self) -> Limits | None: ...

    def check_arguments(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None: ...


class ExecutorSettings(Protocol):
    """What an executor is built from (an `App` is one; the runtime imports no app)."""

    @property
    def tasks(self) -> Mapping[str, Runnable]: ...

    @property
    def max_message_size(self) -> int: ...

    @property
    def max_deliveries(self) -> int: ...

    @property
    def idempotency(self) -> IdempotencyStore | None: ...

    @property
    def visibility_timeout(self) -> float: ...

    @property
    def idempotency_ttl(self) -> float: ...

    @property
    def max_result_size(self) -> int: ...

    @property
    def middlewares(self) -> Sequence[Middleware]: ...

    @property
    def sync_threads(self) -> int: ...


def executor_for(
    app: ExecutorSettings, *, job_timeout: float | None = None, clock: Clock = SYSTEM_CLOCK
) -> Executor:
    """The executor of ``app``'s tasks, for a worker or the Lambda adapter alike."""
    store = app.idempotency
    records = None
    if isinstance(store, Store):  # cancel marks and job records (a keys-only store: none)
        lease = app.visibility_timeout
        size = app.max_result_size
        records = Records(store, lease=lease, max_result_size=size, clock=clock)
    return Executor(
        app.tasks,
        max_message_size=app.max_message_size,
        max_deliveries=app.max_deliveries,
        store=store,
        records=records,
        lease=app.visibility_timeout,
        ttl=app.idempotency_ttl,
        default_timeout=job_timeout,
        clock=clock,
        middleware=app.middlewares,
        threads=SyncThreads(app.sync_threads),
        foreign=foreign_for(app),
    )


# What `Executor.prepare` makes of a delivery: its envelope, task and why it can't run.
Prepared = tuple[Envelope | None, Runnable | None, DecodeError | None]


class Executor:
    """``store`` keeps the idempotency keys of tasks registered with ``idempotent=True``:
    a claim lasts ``lease`` seconds unless extended, a done key ``ttl`` seconds."""

    def __init__(
        self,
        registry: Mapping[str, Runnable],
        *,
        max_message_size: int,
        max_deliveries: int,
        store: IdempotencyStore | None = None,
        lease: float = 30.0,
        ttl: float = 86400.0,
        default_timeout: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
        records: Records | None = None,
        middleware: Sequence[Middleware] = (),
        threads: SyncThreads | None = None,
        foreign: Foreign | None = None,
    ) -> None:
        self._registry = registry
        self._foreign = foreign  # consumer queues (None: the app has none)
        # The app's own list, read per job: a middleware registered later still applies.
        self._middleware = middleware
        self.threads = threads if threads is not None else SyncThreads()
        self._records = records
        self.records = records  # `Jobs.screen` reads cancel marks through it
        self._max_size = max_message_size
        self._max_deliveries = max_deliveries
        self._store = store
        self._lease = lease
        self._ttl = ttl
        self._default_timeout = default_timeout
        self._clock = clock
        # The whole Store, if the store is one (limits and unique keys need it).
        self.shared = limits.check_store(registry.values(), store)
        self._limiter = limits.Limiter(self.shared, lease=lease, clock=clock)

    def prepare(self, delivery: Delivery) -> Prepared:
        """Decode the body, find its task and bind its arguments; any failure is final."""
        if self._foreign is not None and delivery.queue in self._foreign.queues:
            return self._foreign.prepare(delivery, self._max_size)
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

    def execute(
        self, delivery: Delivery, run: Run, prepared: Prepared | None = None
    ) -> Coroutine[Any, Any, Outcome]:
        """Run ``delivery``; ``prepared`` is what `prepare` returned for it, if known.
        The gates a job passes before it starts are read here, at once: a job of a task
        with none of the features that need a step of their own (results, limits, an
        idempotency key) is the coroutine of `_run` itself, with no coroutine around it."""
        env, task, invalid = self.prepare(delivery) if prepared is None else prepared
        if invalid is not None or env is None or task is None:
            return self._invalid(env, task, invalid)
        gate = policy.before_start(delivery.count, self._max_deliveries, run.cancel_requested)
        if task.result_ttl is None:
            if gate is None and self._records is not None:
                # Its cancel mark, read when its batch was fetched (`Records.screen`).
                gate = self._records.screened(env.id)
            if gate is None and task.limits is None and not task.idempotent:
                return self._run(delivery, env, task, run)  # the hot path
        return self._execute(delivery, env, task, run, gate)

    async def _invalid(
        self, env: Envelope | None, task: Runnable | None, invalid: DecodeError | None
    ) -> Outcome:
        attempt = env.attempt if env is not None else 1
        return Outcome(env, task, policy.classify(invalid, attempt, DEFAULT_POLICY), invalid)

    async def _execute(
        self, delivery: Delivery, env: Envelope, task: Runnable, run: Run, gate: Decision | None
    ) -> Outcome:
        """`execute` past its first gates (``gate``: what they decided)."""
        if gate is None and self._records is not None and task.result_ttl is not None:
            gate = await self._start_record(self._records, env, task, delivery, run)
        if gate is not None:
            detail = f"delivered {delivery.count} times" if gate is MAX_DELIVERIES else ""
            outcome = Outcome(env, task, gate, detail=detail)
        elif task.limits is not None:  # a slot or a token first (flow control, limits.py)
            body = partial(self._body, delivery, env, task, run)
            outcome = await self._limiter.run(task.limits, env, task, run, body)
        elif task.idempotent:
            outcome = await self._run_once(delivery, env, task, run)
        else:
            outcome = await self._run(delivery, env, task, run)
        if task.result_ttl is not None and self._records is not None:
            if outcome.decision is ACK and self._records.batched:
                # Written by the acker, just before this job's ack batch (`BatchedAcks`).
                outcome.finishes = self._records.finishes(outcome, task, delivery)
            else:
                with run.catch_cancel():  # the outcome stands; the record is best effort
                    await self._records.after(outcome, task, delivery)
        return outcome

    async def _start_record(
        self, records: Records, env: Envelope, task: Runnable, delivery: Delivery, run: Run
    ) -> Decision | None:
        """The gate of a job of a task with results, once its record says it started."""
        started = records.started(env.id)
        if not isinstance(started, Unscreened):
            return started  # its start was written with its batch's cancel marks read
        # Not written yet: one round trip for the jobs started together.
        gate = None
        with run.catch_cancel():
            gate = await records.before(env, task, delivery)
        return RELEASE if run.cancel_taken else gate

    def _body(
        self, delivery: Delivery, env: Envelope, task: Runnable, run: Run
    ) -> Coroutine[Any, Any, Outcome]:
        if task.idempotent:
            return self._run_once(delivery, env, task, run)
        return self._run(delivery, env, task, run)

    async def _run_once(
        self, delivery: Delivery, env: Envelope, task: Runnable, run: Run
    ) -> Outcome:
        """Run under the job's key: claim it, run, then complete it (success) or release
        it (failure, so a retry can claim it). Never runs without a claim."""
        store = self._store
        if store is None:
            raise RuntimeError(f"task {task.name!r} is idempotent but the worker has no store")
        key = f"{task.name}:{env.key if env.key is not None else env.id}"
        claim = (key, secrets.token_hex(8))  # one owner per run, never reused
        try:
            with run.catch_cancel():
                state = await store.claim(*claim, lease=self._lease)
        except StoreUnavailable as exc:
            # Fail closed: without the store nothing says the key is free.
            why = f"idempotency store unavailable: {exc}"
            return Outcome(env, task, policy.defer(self._lease), detail=why)
        if run.cancel_taken:
            await self._release(claim, run)  # the claim may have been made before the cancel
            return Outcome(env, task, CANCELLED if run.by_user else RELEASE)
        gate = policy.after_claim(state, self._lease)
        if gate is not None:
            why = "is done" if state == "done" else "is in progress elsewhere"
            return Outcome(env, task, gate, detail=f"key {key!r} {why}")
        run.claim = claim
        done = Completion(env.id, store, *claim, self._ttl, partial(setattr, run, "claim", None))
        token = completion_var.set(done)  # for current_job().complete_in(conn)
        try:
            outcome = await self._run(delivery, env, task, run)
        finally:
            # Dropped before the store hears of it: a heartbeat crossing the completion
            # then reports a claim this run no longer holds, which cancels nothing.
            run.claim = None
            completion_var.reset(token)
        if done.used:  # the handler completed the key in its own transaction
            await after_run(done, outcome, self._lease, run)
        elif outcome.decision is ACK:
            # Even if the broker lease was lost meanwhile: the effects happened, and the
            # claim is still ours (complete checks that), so the next delivery is acked
            # as a duplicate instead of running the job again.
            await self._complete(claim, run, outcome)
        else:
            # Failed or cancelled: free the key so the retry can claim it.
            await self._release(claim, run)
        return outcome

    async def _complete(self, claim: tuple[str, str], run: Run, outcome: Outcome) -> None:
        """Commit the key as done before the job is acked, retrying a store outage while
        the claim's lease lasts; if that fails, ``outcome`` is not acked after all."""
        assert self._store is not None
        complete = partial(self._store.complete, *claim, ttl=self._ttl)
        deadline = self._clock.monotonic() + self._lease
        decision: Decision | None = None
        try:
            with run.catch_cancel():
                held = await backoff(
                    complete,
                    what=f"completing key {claim[0]!r}",
                    clock=self._clock,
                    deadline=deadline,
                    retry_on=(StoreUnavailable,),
                    cap=MAX_COMPLETE_PAUSE,
                )
                if not held:
                    # The handler did run: acking beats running it again.
                    log.warning("key %r lapsed before its job completed it", claim[0])
        except StoreUnavailable as exc:
            decision = policy.defer(self._lease)
            outcome.detail = f"could not complete key {claim[0]!r}: {exc}"
        if run.cancel_taken:
            # Whether the key was committed is unknown: hand the job back, and its next
            # delivery finds the key done, or claims it once this claim has lapsed.
            decision = RELEASE
        if decision is not None:
            outcome.decision = decision

    async def _release(self, claim: tuple[str, str], run: Run) -> None:
        assert self._store is not None
        try:
            with run.catch_cancel():  # taken back: the claim lapses with its lease
                await self._store.release(*claim)
        except StoreUnavailable as exc:
            log.warning("could not release key %r; it lapses with its lease: %s", claim[0], exc)

    def _start(
        self, task: Runnable, env: Envelope, limit: handlers.Deadline | None = None
    ) -> Awaitable[Any]:
        # A plain async handler with no middleware is called as it is: no coroutine more.
        if task.handler is None and not self._middleware:
            return task.fn(*env.args, **env.kwargs)
        job = current_job()
        return handlers.attempt(
            task.fn, task.handler, env.args, env.kwargs, job, self._middleware, self.threads, limit
        )

    async def _run(self, delivery: Delivery, env: Envelope, task: Runnable, run: Run) -> Outcome:
        _current.set(Pending(env, delivery.queue, delivery.count))  # `current_job()`
        error: Exception | None = None
        value: Any = None
        clock = self._clock
        started_at = clock.time()
        start = clock.monotonic()
        # Ours (shutdown past grace, or lease lost): taken back, so the job is released.
        # Anyone else's, or a second one on top of ours, propagates. (``with run``: what
        # `Run.catch_cancel` returns, without the call.)
        with run:
            try:
                timeout = task.policy.timeout or self._default_timeout
                run.job_id = env.id  # from now a cancel mark stops it (the lease beat reads it)
                if timeout is None:
                    if task.handler is None and not self._middleware:
                        value = await task.fn(*env.args, **env.kwargs)  # no coroutine more
                    else:
                        value = await self._start(task, env)
                else:
                    # The loop's own timer, not the injected clock: a timer task per job
                    # would cost more than the job. A task's timeout is a real-time bound.
                    limit = asyncio.timeout(timeout)
                    try:
                        async with limit:
                            value = await self._start(task, env, (limit, timeout))
                    except TimeoutError as exc:
                        if not limit.expired():
                            raise  # the handler's own timeout, not the task's
                        name = task.name
                        raise TimeoutError(f"task {name!r} timed out after {timeout}s") from exc
            except Exception as exc:
                error = exc
            finally:
                run.job_id = None  # ended: a cancel can no longer stop it
        if run.cancel_taken:
            decision: Decision = CANCELLED if run.by_user else RELEASE
        elif error is None:
            decision = ACK
        else:
            decision = policy.classify(error, env.attempt, task.policy, snoozes=env.snoozes)
        duration = clock.monotonic() - start
        return Outcome(env, task, decision, error, duration, started_at, "", value)
