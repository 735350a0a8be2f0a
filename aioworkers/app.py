"""The application: task registry, producer API, stats and DLQ, and `worker()`."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar, overload

from ._app_handlers import DEFAULT_SYNC_THREADS
from ._producer import Enqueueing
from ._runtime.clock import SYSTEM_CLOCK, Clock
from ._runtime.cron import periodic_for
from ._runtime.limits import Limits
from ._runtime.priority import Priority
from ._runtime.summary import SUMMARY_INTERVAL
from ._sqlite import absolute_url
from .brokers import (
    Broker,
    ConfiguredLease,
    QueueDepth,
    check_url,
    open_broker,
)
from .brokers.postgres_capabilities import Migratable
from .consumers import ConsumerOptions
from .dlq import DeadLetterQueue as DeadLetterQueue  # re-exported: its home was here
from .envelope import DEFAULT_MAX_SIZE
from .errors import ConfigError, redact_url
from .handles import JobHandle
from .periodic import Overlap, Schedule, decorator
from .store import IdempotencyStore, Store
from .store._choice import StoreChoice, missing
from .task import Task
from .telemetry import Telemetry
from .worker import Worker

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("aioworkers")

ENV_BROKER_URL = "AIOWORKERS_BROKER_URL"
# The embedded default: a file in the working directory, so a worker, the command line
# and the app share it without a server.
DEFAULT_BROKER_URL = "sqlite:///aioworkers.db"
# A done key is remembered this long: longer than any redelivery or retry of its job.
DEFAULT_IDEMPOTENCY_TTL = 24 * 3600.0
DEFAULT_MAX_RESULT_SIZE = 1024 * 1024  # bytes of a job's JSON result kept at most

Hook = Callable[[], Awaitable[None]]


class App(Enqueueing, ConsumerOptions):
    """Registry of tasks bound to one broker.

    ``broker`` is a URL (``sqlite://``, ``redis://``, ``amqp://``, ``sqs://``, ``memory://``)
    or a `Broker`; ``None`` reads ``AIOWORKERS_BROKER_URL`` (set but empty: a `ConfigError`)
    and falls back to the embedded default, ``sqlite:///aioworkers.db`` (a file in the
    working directory, created on first use with a WARNING that names it).

    ``store``: the state workers share beyond the queue, a URL (``redis://``, ``sqlite:///``,
    ``memory://``) or a `Store`; ``None`` reads ``AIOWORKERS_STORE_URL``, else takes the
    broker's (none on RabbitMQ and SQS: see `store`). ``idempotency`` is its old name. A
    done idempotency key is remembered ``idempotency_ttl`` seconds (cancel marks too).

    ``result_ttl``: the default of `task`'s (None: tasks keep no results); a result whose
    JSON is over ``max_result_size`` bytes is not kept (the job still succeeds).
    """

    def __init__(
        self,
        broker: str | Broker | None = None,
        *,
        queue: str = "default",
        concurrency: int = 100,
        visibility_timeout: float = 30.0,
        max_deliveries: int = 5,
        max_message_size: int = DEFAULT_MAX_SIZE,
        grace: float = 30.0,
        store: str | IdempotencyStore | None = None,
        idempotency: str | IdempotencyStore | None = None,
        idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
        sync_threads: int = DEFAULT_SYNC_THREADS,
        retries: int | None = None,
        backoff: float | None = None,
        max_backoff: float | None = None,
        result_ttl: float | None = None,
        max_result_size: int = DEFAULT_MAX_RESULT_SIZE,
    ) -> None:
        if visibility_timeout <= 0:
            raise ConfigError(f"visibility_timeout must be > 0 seconds, got {visibility_timeout}")
        if max_deliveries < 1:
            raise ConfigError(f"max_deliveries must be >= 1, got {max_deliveries}")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        if not idempotency_ttl > 0:
            raise ConfigError(f"idempotency_ttl must be > 0 seconds, got {idempotency_ttl}")
        self.queue = queue
        self.concurrency = concurrency
        self.visibility_timeout = visibility_timeout
        self.max_deliveries = max_deliveries
        self.max_message_size = max_message_size
        self.grace = grace
        self.idempotency_ttl = idempotency_ttl
        self.result_ttl = result_ttl or None
        self.max_result_size = max_result_size
        self._store = StoreChoice(store, idempotency)
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.schedules: dict[str, Schedule] = {}  # periodic jobs, by name
        self._hooks: dict[str, list[Hook]] = {"startup": [], "shutdown": []}
        self._init_handlers(sync_threads, retries, backoff, max_backoff)  # _app_handlers.py
        self._broker: Broker | None = None
        self._broker_url = ""
        self.set_broker(broker)
        # OpenTelemetry: the global providers unless replaced (see `Telemetry`).
        self.telemetry = Telemetry()

    def __repr__(self) -> str:
        return f"<App {self.broker_name} queue={self.queue} tasks={len(self.tasks)}>"

    # -- broker ---------------------------------------------------------------------------

    def set_broker(self, broker: str | Broker | None) -> None:
        """Use another broker (a URL or an instance); only before anything has used it."""
        if self._broker is not None and self._broker_url != "":
            raise ConfigError("the broker is already in use; set it before enqueueing or running")
        if broker is None:
            broker = os.environ.get(ENV_BROKER_URL, DEFAULT_BROKER_URL)
            if not broker.strip():
                # An empty variable is a mistake, not "the default": a job enqueued to a
                # fresh default file in the wrong directory is one no worker ever sees.
                raise ConfigError(
                    f"{ENV_BROKER_URL} is set but empty: unset it for the embedded default "
                    f"({DEFAULT_BROKER_URL}), or give a broker URL"
                )
        if isinstance(broker, str):
            if not broker.strip():
                raise ConfigError(
                    "the broker URL is empty: give a URL (sqlite:///path.db, redis://...), "
                    f"or None for {ENV_BROKER_URL} or the embedded default"
                )
            if check_url(broker) == "sqlite":
                broker = absolute_url(broker)  # the file of the directory the app starts in
            self._broker_url = broker
            self._broker = None
        else:
            self._check_lease(broker)
            self._broker_url = ""
            self._broker = broker

    def _check_lease(self, broker: Broker) -> None:
        # One source of truth: the runtime passes visibility_timeout on every fetch and
        # extend, so a broker built with another default would be silently overruled.
        if isinstance(broker, ConfiguredLease):
            given = broker.visibility_timeout
            if given is not None and given != self.visibility_timeout:
                raise ConfigError(
                    f"the broker was built with visibility_timeout={given:g} but the App has "
                    f"visibility_timeout={self.visibility_timeout:g}: set it on the App only "
                    "(the App passes it to the broker on every call)"
                )

    @property
    def broker(self) -> Broker:
        """The broker instance, created from the URL on first use."""
        if self._broker is None:
            self._broker = open_broker(self._broker_url, visibility_timeout=self.visibility_timeout)
        return self._broker

    @property
    def broker_name(self) -> str:
        """The broker URL with its credentials hidden (a password in the user info, and
        query parameters such as ``password=``, see `redact_url`), or the instance's
        class name."""
        if self._broker_url:
            return redact_url(self._broker_url)
        return type(self._broker).__name__

    @property
    def store(self) -> Store:
        """The state store, created on first use: the one given, else the broker's Redis
        server or SQLite file, or memory on ``memory://``. On RabbitMQ and SQS there is
        none: a `ConfigError`, and a worker with a task that needs one (``idempotent=True``)
        refuses to start until ``store=`` is given (``"memory://"``: one process only)."""
        return self._store.require(self._broker_url, self._broker, self.broker_name)

    @property
    def idempotency(self) -> IdempotencyStore | None:
        """The store, for the runtime: None if there is none and no task needs one; a
        `ConfigError` (so a worker refuses to start) if a task needs one."""
        store = self._store.open(self._broker_url, self._broker)
        if store is None:
            needs = self._store_needs()
            if needs:
                raise missing(needs, self.broker_name)
        return store

    def _store_needs(self) -> list[str]:
        """What among the registered tasks needs a shared store, one entry each."""
        tasks = self.tasks.values()
        needs = [f"task {t.name!r} (idempotent=True)" for t in tasks if t.idempotent]
        needs += [f"task {t.name!r} (concurrency/rate limits)" for t in tasks if t.limits]
        return needs + [f"task {t.name!r} (result_ttl=)" for t in tasks if t.result_ttl]

    async def aclose(self) -> None:
        """Close the broker and store connections."""
        if self._broker is not None:
            await self._broker.aclose()
        store = self._store.opened()
        if store is not None:
            await store.aclose()

    async def __aenter__(self) -> App:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def migrate(self) -> list[int]:
        """Create or upgrade the broker's tables (``postgresql://``; ``aioworkers migrate``
        from the command line): the versioned migrations not applied yet, in order; returns
        their versions (``[]``: up to date, or a broker without tables). A worker refuses
        to start on tables that are behind: nothing else changes the database's schema."""
        broker = self.broker
        return await broker.migrate() if isinstance(broker, Migratable) else []

    # -- tasks ----------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        name: str | None = None,
        *,
        queue: str | None = None,
        retries: int | None = None,
        timeout: float | None = None,
        backoff: float | None = None,
        max_backoff: float | None = None,
        idempotent: bool = False,
        result_ttl: float | None = None,
        max_snoozes: int = 100,
        concurrency: int | None = None,
        rate_limit: str | None = None,
        limit_key: str | None = None,
    ) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Task[P, R]]: ...

    def task(
        self,
        name: Any = None,
        *,
        queue: str | None = None,
        retries: int | None = None,
        timeout: float | None = None,
        backoff: float | None = None,
        max_backoff: float | None = None,
        idempotent: bool = False,
        result_ttl: float | None = None,
        max_snoozes: int = 100,
        concurrency: int | None = None,
        rate_limit: str | None = None,
        limit_key: str | None = None,
    ) -> Any:
        """Register a handler: ``@app.task`` or ``@app.task(retries=5, ...)`` on an
        ``async def``, or on a plain ``def`` (run in a worker thread, see README "Handlers").

        ``retries`` is how many times a failed job is tried again (so ``retries + 1``
        attempts in all); ``timeout`` bounds one attempt; the delay before attempt n+1 is
        uniform in ``[c / 2, c]``, ``c = min(max_backoff, backoff * 2 ** (n - 1))``; the
        three default to the `App`'s (8, 10 s, 3600 s). ``idempotent`` runs
        each job at most once to completion per idempotency key (the enqueue ``key``, else
        the job id), never twice at once; its keys live in the `App`'s ``store``.
        ``result_ttl`` keeps each job's status and return value that many seconds (None:
        the App's ``result_ttl``; 0: none), see `JobHandle`. A job that raises
        `aioworkers.Snooze` more than ``max_snoozes`` times is dead-lettered.
        ``concurrency`` (attempts running at once) and ``rate_limit`` (``"N/s"``, ``"N/m"``
        or ``"N/h"`` starts) hold across every worker, per value of the argument
        ``limit_key`` if given (README, "Flow control").
        """
        if max_snoozes < 0 or (result_ttl is not None and result_ttl < 0):
            raise ConfigError("max_snoozes and result_ttl must be >= 0")
        ttl = self.result_ttl if result_ttl is None else (result_ttl or None)
        policy = self.task_policy(retries, backoff, max_backoff, timeout, max_snoozes)

        def register(fn: Callable[P, Coroutine[Any, Any, R]]) -> Task[P, R]:
            task_name = name if isinstance(name, str) else fn.__name__
            if task_name in self.tasks:
                raise ConfigError(f"a task named {task_name!r} is already registered")
            self.check_task_queue(queue)  # not a consumer's (consumers.py)
            task = Task(self, fn, name=task_name, queue=queue, policy=policy, idempotent=idempotent)
            task.result_ttl = ttl
            task.limits = Limits.build(
                task_name,
                task.signature,
                concurrency=concurrency,
                rate_limit=rate_limit,
                limit_key=limit_key,
            )
            self.tasks[task_name] = task
            return task

        if callable(name):
            return register(name)
        return register

    def periodic(
        self,
        cron: str | None = None,
        every: float | None = None,
        *,
        name: str | None = None,
        tz: str = "UTC",
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        queue: str | None = None,
        overlap: Overlap = "allow",
        catchup: float = 0.0,
        **task_options: Any,
    ) -> Callable[[Any], Task[Any, Any]]:
        """Enqueue a task on a schedule, ``cron`` (5 fields, or 6 with seconds first, in
        ``tz``) or ``every`` seconds: every worker schedules, and each slot is enqueued
        once (README, "Periodic jobs"). Registers the function as a task (``task_options``
        as for `task`), or schedules a `Task` given as it is."""
        options: dict[str, Any] = {"cron": cron, "every": every, "name": name, "tz": tz}
        options |= {"args": args}
        options |= {"kwargs": kwargs, "queue": queue, "overlap": overlap, "catchup": catchup}
        return decorator(self, options, {"queue": queue, **task_options})

    def on_startup(self, fn: Hook) -> Hook:
        """Register ``async def fn()`` to run when a worker starts, before it fetches."""
        self._hooks["startup"].append(fn)
        return fn

    def on_shutdown(self, fn: Hook) -> Hook:
        """Register ``async def fn()`` to run after a worker has drained."""
        self._hooks["shutdown"].append(fn)
        return fn

    async def run_hooks(self, which: Literal["startup", "shutdown"]) -> None:
        """Run the ``on_startup`` or ``on_shutdown`` hooks, in order (a worker and the
        Lambda handler call this; an embedding service that runs jobs its own way may)."""
        for hook in self._hooks[which]:
            await hook()

    # -- worker, stats, DLQ -----------------------------------------------------------------

    def worker(
        self,
        *,
        concurrency: int | None = None,
        queues: Sequence[str] | None = None,
        grace: float | None = None,
        poll: float = 1.0,
        max_jobs: int | None = None,
        job_timeout: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
        scheduler: bool = True,
        priority: Priority = "fair",
        summary_interval: float | None = SUMMARY_INTERVAL,
        gc_freeze: bool = True,
    ) -> Worker:
        """A worker for ``queues`` (default: the app's queue and every task's queue).

        ``poll`` bounds how long one fetch waits, and so how soon a stop takes effect.
        ``max_jobs`` stops the worker (`Worker.recycle`) once it has started that many
        jobs; ``job_timeout`` bounds each attempt of tasks registered without a timeout.
        ``clock`` is the time the worker's runtime runs on (leases, backoff, shutdown
        waits): tests pass `aioworkers.testing.FakeClock` to move it themselves.
        ``scheduler=False``: this worker fires no periodic jobs (others do).
        ``priority="strict"`` fills free slots from the first of ``queues`` first, and
        from each next one only what the earlier ones could not fill; ``"fair"``: the
        queues take turns. Every ``summary_interval`` seconds (None: never) the worker
        logs an INFO line of what it did. ``gc_freeze``: the first worker of the process
        freezes what exists as it starts out of the garbage collector's walks
        (`aioworkers.worker.freeze_gc`); False leaves the collector alone.
        """
        return Worker(
            self,
            concurrency=concurrency or self.concurrency,
            queues=list(queues) if queues else self.queues(),
            grace=self.grace if grace is None else grace,
            poll=poll,
            max_jobs=max_jobs,
            job_timeout=job_timeout,
            clock=clock,
            periodic=periodic_for(self, clock) if scheduler and self.schedules else None,
            priority=priority,
            summary_interval=summary_interval,
            gc_freeze=gc_freeze,
        )

    def job(self, job_id: str) -> JobHandle:
        """A handle of the job ``job_id`` (in any process: its status and result are in the
        state store)."""
        return JobHandle(job_id, app=self)

    async def cancel(self, job_id: str) -> bool:
        """Cancel the job ``job_id``: True if it had not finished (see `JobHandle.cancel`)."""
        return await self.job(job_id).cancel()

    def queues(self) -> list[str]:
        """The app's queue and every queue a registered task names, in order."""
        names = [self.queue, *(t.queue for t in self.tasks.values() if t.queue)]
        if self.consumers and not any(t.queue is None for t in self.tasks.values()):
            names.remove(self.queue)  # only consumers: the default queue has no task
        return list(dict.fromkeys(names))

    async def stats(self, queue: str | None = None) -> QueueDepth:
        """Jobs ready, in flight, delayed and dead on ``queue`` (default: the app's)."""
        return await self.broker.depth(queue or self.queue)

    def dlq(self, queue: str | None = None) -> DeadLetterQueue:
        """The dead-letter queue of ``queue`` (default: the app's); a `ConfigError` if the
        broker cannot list dead letters."""
        return DeadLetterQueue(self.broker, queue or self.queue)
