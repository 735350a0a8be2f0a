"""The worker: wiring of the runtime. `run()` is what the CLI and an embedding service call."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from types import TracebackType
from typing import Literal, Protocol

import anyio
import anyio.abc

with contextlib.suppress(ImportError):
    # The asyncio backend anyio imports on a worker's first task group: imported with the
    # worker instead, so a starting worker's first fetch does not wait ~15 ms for it.
    importlib.import_module("anyio._backends._asyncio")

from ._registry import keep_registered
from ._runtime import shutdown
from ._runtime.clock import SYSTEM_CLOCK, Clock
from ._runtime.executor import ExecutorSettings, executor_for
from ._runtime.fetcher import Fetcher, delayed_jobs, queues_empty
from ._runtime.inflight import InFlight
from ._runtime.jobs import Jobs
from ._runtime.lease import keep_leases
from ._runtime.outcome import OUTCOMES
from ._runtime.priority import Priority, StrictFetcher, check_priority
from ._runtime.scheduler import Scheduler
from ._runtime.settle import BatchedAcks, Settler
from ._runtime.summary import SUMMARY_INTERVAL, log_summaries
from .brokers.base import Broker, ScreensCancelMarks
from .errors import AioworkersError, ConfigError
from .store.base import CancelMarksAt
from .telemetry import Telemetry, messaging_system

log = logging.getLogger("aioworkers")

BURST_POLL = 0.2


class Service(Protocol):
    """A loop the worker runs beside its jobs until it stops (the periodic scheduler)."""

    async def run(self) -> None: ...


class WorkerApp(ExecutorSettings, Protocol):
    """What a worker takes from its `App` (a structural type: the worker imports no app)."""

    @property
    def broker(self) -> Broker: ...

    @property
    def broker_name(self) -> str: ...

    @property
    def telemetry(self) -> Telemetry: ...

    async def run_hooks(self, which: Literal["startup", "shutdown"]) -> None: ...


_gc_frozen = False


def freeze_gc() -> None:
    """Once per process, as a worker starts: move every object there is (modules,
    classes, the app and its clients: what lives as long as the process) out of the
    cyclic collector's reach (`gc.freeze`). Each full collection would otherwise walk all
    of them again; with a worker's imports that walk cost more per job than the rest of
    the framework's own work (benchmarks/README.md). Objects are still freed as usual
    when their count drops; only a cycle among the frozen ones is never collected."""
    global _gc_frozen
    if _gc_frozen or not gc.isenabled():
        return  # done, or the process manages the collector itself
    _gc_frozen = True
    # The young generations' garbage first (cheap). Not a full collection: it takes
    # ~10-20 ms with a worker's imports, and found nothing in a fresh worker process (the
    # imports' garbage is collected as they run).
    gc.collect(1)
    gc.freeze()


class Worker:
    """Runs jobs from ``queues`` with at most ``concurrency`` in flight.

    ``await worker.run()`` until `stop()`; ``async with app.worker():`` runs it in the
    background on the current loop and drains it on exit. The worker installs no signal
    handlers: `stop()` is what a SIGTERM handler calls (a second call cancels now).

    If fetching, or a service task (lease loop, acker), fails with an error no broker
    should let out (not `BrokerUnavailable`), the worker logs it at once and stops as on
    `stop()`; `run()` then raises it.

    ``max_jobs`` recycles the worker (see `recycle`) once it has started that many jobs;
    ``job_timeout`` bounds each attempt of a task registered without a ``timeout``.
    ``clock`` is where the runtime sleeps and reads the time (tests pass a fake one).
    Every ``summary_interval`` seconds (None: never) the worker logs one INFO line of
    what it did; each settled job is one DEBUG line.
    """

    def __init__(
        self,
        app: WorkerApp,
        *,
        concurrency: int,
        queues: list[str],
        grace: float,
        poll: float,
        max_jobs: int | None = None,
        job_timeout: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
        periodic: Service | None = None,
        priority: Priority = "fair",
        summary_interval: float | None = SUMMARY_INTERVAL,
        gc_freeze: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        if grace < 0:
            raise ConfigError(f"grace must be >= 0 seconds, got {grace}")
        if not queues:
            raise ConfigError("a worker needs at least one queue")
        self.app = app
        self.concurrency = concurrency
        self.queues = queues
        self.grace = grace
        self.poll = poll
        self.max_jobs = max_jobs
        self.clock = clock
        self.periodic = periodic  # the scheduler loop of periodic jobs, if any
        self.priority = check_priority(priority)  # "strict": queues drained in order
        self.summary_interval = summary_interval
        self.gc_freeze = gc_freeze
        self.state = "IDLE"
        self.recycled: str | None = None  # why the worker stopped itself, if it did
        self._inflight = InFlight()
        self._scheduler = Scheduler(concurrency, self._inflight, limit=max_jobs)
        # Checked once: with no OpenTelemetry provider configured this is None and the
        # hot path makes no telemetry call at all.
        self._telemetry = app.telemetry.for_worker(
            messaging_system(app.broker), self._inflight.snapshot
        )
        executor = executor_for(app, job_timeout=job_timeout, clock=clock)
        records = executor.records
        if records is not None:
            records.batched = True  # a job's final records go with its ack
        write = None if records is None else records.write
        # The broker reads the cancel marks as it fetches, if the store is on its server.
        self._screening: ScreensCancelMarks | None = None
        store, broker = app.idempotency, app.broker
        if (
            records is not None
            and isinstance(broker, ScreensCancelMarks)
            and isinstance(store, CancelMarksAt)
            and broker.screen_cancel_marks(*store.cancel_marks_at())
        ):
            self._screening = broker
        self._acks = BatchedAcks(app.broker, clock=clock, write_finishes=write)
        self._settler = Settler(self._acks, telemetry=self._telemetry, clock=clock)
        self._jobs = Jobs(
            executor,
            self._settler,
            self._inflight,
            scheduler=self._scheduler,
            telemetry=self._telemetry,
            acks=self._acks,
        )
        self._quiet = False
        self._shutdown = shutdown.Shutdown(self._inflight, clock, grace)
        self._fetchers: anyio.abc.TaskGroup | None = None
        self._fetcher_list: list[Fetcher] = []
        self._wait_delayed = True
        self._failure: Exception | None = None
        self._started = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<Worker {self.app.broker_name}:{','.join(self.queues)} {self.state} "
            f"in_flight={len(self._inflight)}/{self.concurrency}>"
        )

    @property
    def counts(self) -> dict[str, int]:
        """Jobs settled by this worker, by outcome: ok, retried, dead, released, lease_lost,
        duplicate (key already done: acked unrun), deferred (key busy or store down),
        throttled (a concurrency or rate limit held it back: same attempt later)."""
        return {str(name): n for name, n in self._settler.counts.items()}

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def jobs_started(self) -> int:
        return self._scheduler.started

    def quiet(self) -> None:
        """Stop fetching (for good); jobs running go on, fetched ones not started are
        released to other workers. `run()` returns only after `stop()` (or, in burst mode,
        once nothing is left)."""
        if not self._quiet:
            self._quiet = True
            if self.state == "RUNNING":
                self.state = "QUIET"
            for fetcher in self._fetcher_list:
                fetcher.interrupt()  # no backoff pause outlives a stop
            unstarted = self._scheduler.close()
            if unstarted:
                # Hand them to another worker now rather than after their lease runs out.
                hand_back = self._jobs.hand_back(unstarted)
                self._shutdown.others.append(asyncio.get_running_loop().create_task(hand_back))

    def stop(self) -> None:
        """Quiet, drain within ``grace``, release the rest. A second call cancels now: the
        runs get a second to release their jobs, the rest is left to its lease."""
        self.quiet()
        self._stopping.set()
        if self._shutdown.stop() and self._fetchers is not None:
            self._fetchers.cancel_scope.cancel()  # a fetch that hangs is not waited for

    async def wait_started(self) -> None:
        """Return once `run()` has run the startup hooks and begun fetching."""
        await self._started.wait()

    def recycle(self, reason: str) -> None:
        """Stop because of a limit (``reason``), for a fresh process to take over: `stop()`
        with `recycled` set, so the CLI exits with its recycle code. Ignored once stopping."""
        if self._shutdown.stops == 0:
            self.recycled = reason
            log.info("recycling: %s; draining %d jobs", reason, len(self._inflight))
            self.stop()

    async def run(self, *, burst: bool = False, wait_delayed: bool = True) -> None:
        """Run until `stop()`, or in ``burst`` mode until the queues are empty.

        ``wait_delayed=False`` (the CLI's ``--burst``) ends a burst run once nothing is
        ready or in flight: delayed jobs and retries waiting for their backoff are left for
        a later run, and a log line says how many."""
        if self.state != "IDLE":
            raise RuntimeError("a Worker runs once; make another with app.worker()")
        self.state = "RUNNING"
        self._wait_delayed = wait_delayed
        await self.app.run_hooks("startup")
        if self.gc_freeze:
            freeze_gc()
        try:
            log.info("worker started %r", self)
            self._started.set()
            await self._run(burst)
            if self._failure is not None:
                raise self._failure
            if burst and not wait_delayed:
                await self._report_delayed()
        finally:
            self.state = "STOPPED"
            await self.app.run_hooks("shutdown")
            counts = self._settler.counts
            summary = " ".join(f"{k}={counts[k]}" for k in OUTCOMES)
            log.info("worker stopped %r %s", self, summary)

    async def _run(self, burst: bool) -> None:
        broker = self.app.broker
        lease = partial(
            keep_leases,
            broker,
            self._inflight,
            lease=self.app.visibility_timeout,
            store=self.app.idempotency,
            telemetry=self._telemetry,
            clock=self.clock,
        )
        async with anyio.create_task_group() as service:
            service.start_soon(self._service, "keeping leases", lease)
            service.start_soon(self._service, "acking", self._acks.run_acks)
            service.start_soon(keep_registered, self, lambda: self.app.idempotency, self.clock)
            if self._telemetry is not None:
                depths = partial(self._telemetry.poll_depth, broker.depth, self.queues)
                service.start_soon(self._service, "polling queue depths", depths)
            if self.max_jobs is not None:
                service.start_soon(self._recycle_when_exhausted)
            if self.summary_interval is not None:
                summaries = partial(
                    log_summaries,
                    self._settler.counts,
                    self._inflight.__len__,
                    self.clock,
                    self.summary_interval,
                )
                service.start_soon(self._service, "logging summaries", summaries)
            if self.periodic is not None:
                service.start_soon(self._service, "firing schedules", self.periodic.run)
            try:
                async with anyio.create_task_group() as self._fetchers:
                    if self.priority == "strict":  # one loop, asking the queues in order
                        fetchers = [self._fetcher(queue, burst) for queue in self.queues]
                        fetch = StrictFetcher(fetchers).run
                        self._fetchers.start_soon(self._service, "fetching", fetch, False)
                    for queue in self.queues if self.priority == "fair" else ():
                        what = f"fetching from {queue!r}"
                        fetch = self._fetcher(queue, burst).run
                        self._fetchers.start_soon(self._service, what, fetch, False)
                self.quiet()
                if not burst:
                    await self._stopping.wait()
                await self._shutdown.drain()
            finally:
                if len(self._inflight):
                    await self._shutdown.abandon()  # cancelled from outside: still hand back
            with self._shutdown.settle_window():
                await self._service("acking", self._acks.flush_acks, False)
            # Leases are kept until every job is settled; only then stop the lease loop.
            service.cancel_scope.cancel()

    def _fetcher(self, queue: str, burst: bool) -> Fetcher:
        fetcher = Fetcher(
            self.app.broker,
            queue,
            self._scheduler,
            self._jobs,
            wait=min(self.poll, BURST_POLL) if burst else self.poll,
            lease=self.app.visibility_timeout,
            quiet=lambda: self._quiet,
            drained=self._drained if burst else None,
            telemetry=self._telemetry,
            queues=len(self.queues),
            clock=self.clock,
            screening=self._screening,
        )
        self._fetcher_list.append(fetcher)
        return fetcher

    async def _service(
        self, what: str, fn: Callable[[], Awaitable[None]], again: bool = True
    ) -> None:
        """Run ``fn``; if it fails, log it and stop the worker (`run()` raises the error).
        With ``again``, ``fn`` runs again after a pause: the drain still needs leases kept
        and acks sent."""
        while True:
            try:
                return await fn()
            except Exception as exc:
                self._fail(what, exc)
                if not again:
                    return
            await self.clock.sleep(0.1)

    def _fail(self, what: str, exc: Exception) -> None:
        while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # raised inside a task group of the service
        if self._failure is not None:
            log.error("%s failed again: %s: %s", what, type(exc).__name__, exc)
            return
        self._failure = exc
        # Logged now: an embedding service may not look at the worker until it exits.
        if isinstance(exc, AioworkersError):  # says what to fix: no traceback needed
            log.error("%s failed, stopping the worker: %s", what, exc)
        else:
            log.error("%s failed, stopping the worker", what, exc_info=exc)
        self.quiet()
        self._stopping.set()

    async def _recycle_when_exhausted(self) -> None:
        # The scheduler starts no job past max_jobs: what it holds beyond is handed back.
        await self._scheduler.exhausted.wait()
        self.recycle(f"ran max_jobs={self.max_jobs} jobs")

    async def _drained(self) -> bool:
        if len(self._inflight) or self._acks.pending_acks:
            return False
        return await queues_empty(self.app.broker, self.queues, delayed=self._wait_delayed)

    async def _report_delayed(self) -> None:
        left = await delayed_jobs(self.app.broker, self.queues)
        if left:
            log.info(
                "burst run done: %d delayed job%s left for a later run "
                "(wait_delayed=True, or --wait-delayed, waits for them)",
                left,
                "" if left == 1 else "s",
            )

    async def __aenter__(self) -> Worker:
        self._task = asyncio.create_task(self.run())
        started = asyncio.create_task(self._started.wait())
        await asyncio.wait({self._task, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if self._task.done():
            await self._task  # raises what failed at start-up
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        assert self._task is not None
        await self._task
