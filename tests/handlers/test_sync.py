"""Sync handlers: a plain ``def`` runs in a worker thread, at most ``sync_threads`` at once,
its lease kept while it runs; a timeout retries the job while the thread keeps its slot."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from aioworkers import App, ConfigError, current_job
from aioworkers._runtime.threads import Slots, SyncThreads
from aioworkers.testing import FakeClock

from ..runtime.conftest import POLL, VISIBILITY, MakeApp, advance_until, run_burst
from .conftest import eventually


class Gauge:
    """How many handlers run at once, and the most there ever were."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.most = 0

    def __enter__(self) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1


async def test_a_sync_handler_runs_in_a_thread_and_sees_its_job(make_app: MakeApp) -> None:
    app, _ = make_app()
    seen: list[tuple[str, str, int]] = []
    loop_thread = threading.get_ident()

    @app.task
    def blocking(n: int) -> int:
        assert threading.get_ident() != loop_thread
        seen.append((threading.current_thread().name, current_job().task, n))
        return n

    await blocking.enqueue(7)
    worker = app.worker(poll=POLL)
    await run_burst(worker)
    assert worker.counts["ok"] == 1
    ((name, task, n),) = seen
    assert name.startswith("aioworkers-sync-")
    assert task == "blocking"
    assert n == 7


async def test_threads_never_exceed_the_limit_under_load(make_app: MakeApp) -> None:
    app, _ = make_app(sync_threads=3)
    gauge = Gauge()
    threads: set[int] = set()

    @app.task
    def blocking(i: int) -> None:
        with gauge:
            threads.add(threading.get_ident())
            threading.Event().wait(0.01)  # real blocking I/O stand-in

    @app.task
    async def beside(i: int) -> None:
        await asyncio.sleep(0)

    await app.enqueue_many(
        [blocking.call(i) for i in range(40)] + [beside.call(i) for i in range(40)]
    )
    worker = app.worker(concurrency=20, poll=POLL)
    await run_burst(worker, within=30)
    assert worker.counts["ok"] == 80
    assert gauge.most == 3  # the limit was reached, and never passed
    assert len(threads) <= 3  # threads are reused, never more than the limit


async def test_a_timed_out_sync_job_is_retried_and_its_thread_keeps_its_slot(
    make_app: MakeApp,
) -> None:
    app, faulty = make_app(sync_threads=1)
    release = threading.Event()
    attempts: list[int] = []
    returned: list[int] = []

    @app.task(retries=1, backoff=0.0, timeout=0.2)
    def stuck() -> None:
        attempt = current_job().attempt
        attempts.append(attempt)
        if attempt == 1:
            release.wait(10)  # a timeout cannot stop this thread
        returned.append(attempt)

    await stuck.enqueue()
    worker = app.worker(poll=POLL)
    threads: SyncThreads = worker._jobs._executor.threads
    async with worker:
        # The first attempt timed out and was retried; the retry waits for the one thread.
        await eventually(lambda: faulty.count("retry", ok=True) == 1 and threads.slots.waiting == 1)
        assert attempts == [1]
        assert threads.busy == 1
        assert returned == []
        release.set()  # the thread ends: its late return is ignored, its slot goes on
        await eventually(lambda: worker.counts.get("ok", 0) == 1)
    assert attempts == [1, 2]
    assert returned == [1, 2]
    assert worker.counts["retried"] == 1
    assert worker.counts["ok"] == 1
    assert threads.busy == 0


async def test_a_sync_jobs_lease_is_extended_while_it_runs(
    make_app: MakeApp, clock: FakeClock
) -> None:
    app, faulty = make_app(clock=clock)
    started = threading.Event()
    release = threading.Event()

    @app.task
    def long() -> None:
        started.set()
        release.wait(10)

    await long.enqueue()
    worker = app.worker(poll=POLL, clock=clock)
    run = asyncio.create_task(worker.run(burst=True))
    await advance_until(clock, started.is_set, what="the handler to start")
    # Three leases' worth of clock: never redelivered, its lease extended all along.
    await clock.advance(3 * VISIBILITY)
    assert worker.in_flight == 1
    assert faulty.count("extend", ok=True) >= 3
    assert (await app.stats()).in_flight == 1
    release.set()
    await advance_until(clock, run.done, what="the burst to end")
    await run
    assert worker.counts["ok"] == 1
    assert faulty.count("fetch", ok=True) >= 1
    assert worker.counts.get("lease_lost", 0) == 0


async def test_stop_drains_running_sync_jobs(make_app: MakeApp) -> None:
    app, _ = make_app(sync_threads=2)
    started = threading.Semaphore(0)
    release = threading.Event()

    @app.task
    def blocking(i: int) -> None:
        started.release()
        release.wait(10)

    await app.enqueue_many([blocking.call(i) for i in range(2)])
    worker = app.worker(poll=POLL, grace=10)
    run = asyncio.create_task(worker.run())
    for _ in range(2):
        assert await asyncio.to_thread(started.acquire, True, 10)
    worker.stop()  # what SIGTERM does: the two running jobs may finish within grace
    await asyncio.sleep(0.05)
    assert not run.done()
    assert worker.in_flight == 2
    release.set()
    async with asyncio.timeout(10):
        await run
    assert worker.counts["ok"] == 2
    assert worker.counts.get("released", 0) == 0


async def test_slots_are_handed_over_in_order_and_survive_cancelled_waiters() -> None:
    slots = Slots(1)
    await slots.acquire()
    first = asyncio.create_task(slots.acquire())
    second = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    first.cancel()
    slots.release()
    await second
    assert slots.busy == 1
    slots.release()
    assert slots.busy == 0


def test_sync_threads_must_be_a_positive_int() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="sync_threads"):
            App("memory://", sync_threads=bad)  # type: ignore[arg-type]


async def test_sync_handler_errors_fail_the_attempt(make_app: MakeApp) -> None:
    app, _faulty = make_app(retries=0)

    @app.task
    def broken() -> None:
        raise ValueError("bad row")

    await broken.enqueue()
    await run_burst(app.worker(poll=POLL))
    (letter,) = await app.dlq().list()
    assert letter.reason == "max_retries"
    assert letter.error_type == "ValueError"


class AsyncCallable:
    def __init__(self, ran: list[str]) -> None:
        self.ran = ran

    async def __call__(self, n: int) -> None:
        self.ran.append(f"async {n}")


async def test_an_object_with_an_async_call_is_an_async_task(make_app: MakeApp) -> None:
    app, _ = make_app(retries=0)
    ran: list[str] = []
    task = app.task(name="obj")(AsyncCallable(ran))

    def returns_a_coroutine() -> Any:
        return asyncio.sleep(0)  # a def that looks sync: refused when it runs

    wrong = app.task(name="wrong")(returns_a_coroutine)
    assert task.handler is None
    await task.enqueue(1)
    await wrong.enqueue()
    await run_burst(app.worker(poll=POLL))
    assert ran == ["async 1"]
    (letter,) = await app.dlq().list()
    assert letter.task == "wrong"
    assert "async def" in (letter.error or "")


async def test_the_wait_for_a_thread_does_not_count_in_the_timeout(make_app: MakeApp) -> None:
    # Real time: the task's timeout is a real-time bound (the loop's own timer).
    app, _ = make_app(sync_threads=1, retries=0)
    ran: list[int] = []

    @app.task(timeout=1.0)
    def blocking(i: int) -> None:
        threading.Event().wait(0.6)  # alone, well within its timeout
        ran.append(i)

    await app.enqueue_many([blocking.call(i) for i in range(2)])
    worker = app.worker(poll=POLL)
    await run_burst(worker)
    # The second waited 0.6 s for the one thread, then ran 0.6 s: 1.2 s, not timed out.
    assert sorted(ran) == [0, 1]
    assert worker.counts["ok"] == 2
