"""Metric names, attributes and values after a workload whose outcomes are known, on
every broker, read with the SDK's in-memory reader."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

import aioworkers
from aioworkers.telemetry import Telemetry
from aioworkers.telemetry.metrics import LAG_WINDOW, LagWindow

from .conftest import Backend, Otel

N_OK, M_RETRIED, K_DEAD = 12, 5, 3
LAG = 0.3


def by(points: list[Any], **attrs: str) -> list[Any]:
    return [p for p in points if all(p.attributes.get(k) == v for k, v in attrs.items())]


def total(points: list[Any], **attrs: str) -> int:
    return sum(int(p.value) for p in by(points, **attrs))


async def run_workload(app: aioworkers.App) -> tuple[aioworkers.Worker, str]:
    tries: dict[int, int] = {}

    @app.task(retries=0)
    async def fine(i: int) -> None:
        await asyncio.sleep(0.01)

    @app.task(retries=2, backoff=0)
    async def flaky(i: int) -> None:
        tries[i] = tries.get(i, 0) + 1
        if tries[i] == 1:
            raise ConnectionError("first try fails")

    @app.task(retries=0)
    async def broken(i: int) -> None:
        raise ValueError("always fails")

    calls = [fine.call(i) for i in range(N_OK)]
    calls += [flaky.call(i) for i in range(M_RETRIED)]
    calls += [broken.call(i) for i in range(K_DEAD)]
    await app.enqueue_many(calls)
    worker = app.worker(concurrency=8, poll=0.1)
    return worker, app.queue


async def test_metrics_after_a_known_workload(otel: Otel, backend: Backend) -> None:
    app = backend.app()
    app.telemetry = otel.telemetry()
    worker, queue = await run_workload(app)
    system = {"messaging.system": backend.system, "messaging.destination.name": queue}
    attempts = N_OK + 2 * M_RETRIED + K_DEAD
    settled = {"ready": 0, "in_flight": 0, "delayed": 0, "dead": K_DEAD}
    await asyncio.sleep(LAG)  # every job waits at least this long before it starts
    async with app, worker:
        await wait_until(lambda: sum(worker.counts.values()) >= attempts, backend.within)
        # The gauges read the last depth poll: wait for one after the last settle.
        await wait_until(lambda: depth_states(otel, system) == settled, 5.0)
        jobs = otel.points("aioworkers.jobs")
        states = depth_states(otel, system)
        in_flight = otel.points("aioworkers.jobs.in_flight")

    assert dict(worker.counts) == {"ok": N_OK + M_RETRIED, "retried": M_RETRIED, "dead": K_DEAD}
    assert total(jobs, **system, **{"aioworkers.job.outcome": "ok"}) == N_OK + M_RETRIED
    assert total(jobs, **{"aioworkers.task.name": "fine", "aioworkers.job.outcome": "ok"}) == N_OK
    assert total(jobs, **{"aioworkers.task.name": "flaky", "aioworkers.job.outcome": "ok"}) == (
        M_RETRIED
    )
    assert total(jobs, **system, **{"aioworkers.job.outcome": "retried"}) == M_RETRIED
    assert total(jobs, **system, **{"aioworkers.job.outcome": "dead"}) == K_DEAD
    assert {p.attributes["aioworkers.job.outcome"] for p in jobs} == {"ok", "retried", "dead"}
    assert total(jobs) == attempts

    durations = otel.points("messaging.process.duration")
    assert sum(p.count for p in durations) == attempts
    assert all(p.attributes["messaging.operation.name"] == "process" for p in durations)
    assert all(p.attributes["messaging.system"] == backend.system for p in durations)
    (fine,) = by(durations, **{"aioworkers.task.name": "fine"})
    assert "error.type" not in fine.attributes
    assert fine.count == N_OK
    assert fine.sum >= 0.01 * N_OK
    assert sum(p.count for p in by(durations, **{"error.type": "ConnectionError"})) == M_RETRIED
    assert sum(p.count for p in by(durations, **{"error.type": "ValueError"})) == K_DEAD

    (lag,) = otel.points("aioworkers.queue.lag")
    assert lag.attributes == system
    assert LAG <= lag.value < LAG + 10
    assert total(otel.points("messaging.client.consumed.messages"), **system) == attempts
    sent = otel.points("messaging.client.sent.messages")
    assert (
        total(sent, **system, **{"messaging.operation.name": "send"}) == N_OK + M_RETRIED + K_DEAD
    )

    assert states == settled
    assert [p.value for p in by(in_flight, **system)] == [0]


async def wait_until(condition: Callable[[], bool], within: float) -> None:
    """Poll ``condition`` until it holds or ``within`` seconds passed: the caller asserts."""
    deadline = time.monotonic() + within
    while True:
        if condition() or time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.05)


def depth_states(otel: Otel, system: dict[str, str]) -> dict[str, int]:
    depth = by(otel.points("aioworkers.queue.depth"), **system)
    return {p.attributes["aioworkers.queue.state"]: int(p.value) for p in depth}


async def test_lease_extensions_are_counted(otel: Otel, redis_url: str) -> None:
    app = aioworkers.App(redis_url, queue="lease", visibility_timeout=0.3)
    app.telemetry = otel.telemetry()

    @app.task
    async def slow() -> None:
        await asyncio.sleep(0.5)

    await slow.enqueue()
    async with app:
        await app.worker(poll=0.1).run(burst=True)
    extended = otel.points("aioworkers.lease.extensions")
    assert total(extended, **{"messaging.destination.name": "lease"}) >= 2
    assert total(otel.points("aioworkers.jobs"), **{"aioworkers.job.outcome": "ok"}) == 1


async def test_no_provider_means_no_telemetry_on_the_hot_path() -> None:
    # The global providers are the API's proxies in this test process: nothing is on.
    app = aioworkers.App("memory://")
    assert app.telemetry.for_worker("memory", list) is None
    assert app.telemetry.producer("memory") is None
    assert repr(app.telemetry) == "<Telemetry off>"
    worker = app.worker()
    assert worker._telemetry is None
    assert worker._jobs._job == worker._jobs.run


async def test_a_provider_passed_in_turns_telemetry_on(otel: Otel) -> None:
    tel = Telemetry(meter_provider=otel.meter_provider)
    worker_tel = tel.for_worker("memory", list)
    assert worker_tel is not None
    assert worker_tel.tracer is None
    assert repr(tel) == "<Telemetry metrics>"


async def test_depth_gauges_hold_the_last_poll_after_a_burst_run(
    otel: Otel, backend: Backend
) -> None:
    app = backend.app()
    # The default interval: the only polls are the first one and the one at stop.
    app.telemetry = otel.telemetry(depth_interval=15.0)

    @app.task(retries=0)
    async def maybe(fail: bool) -> None:
        if fail:
            raise RuntimeError("no")

    await app.enqueue_many([maybe.call(False), maybe.call(True), maybe.call(True)])
    await app.enqueue("maybe", [False], delay=60)
    async with app:
        worker = app.worker(poll=0.1)
        async with worker:
            for _ in range(100):
                if sum(worker.counts.values()) == 3:
                    break
                await asyncio.sleep(0.05)
    depth = otel.points("aioworkers.queue.depth")
    states = {p.attributes["aioworkers.queue.state"]: p.value for p in depth}
    assert states == {"ready": 0, "in_flight": 0, "delayed": 1, "dead": 2}


def test_the_lag_gauge_holds_the_longest_wait_of_the_last_windows() -> None:
    window = LagWindow()
    t0 = 1000 * LAG_WINDOW  # the start of a window
    window.add(0.5, t0)
    window.add(2.0, t0 + 1)
    window.add(1.0, t0 + 2)
    assert window.longest(t0 + 3) == 2.0
    assert window.longest(t0 + 3) == 2.0  # reading it changes nothing
    window.add(0.1, t0 + LAG_WINDOW + 1)  # a new window: the last one still counts
    assert window.longest(t0 + LAG_WINDOW + 2) == 2.0
    assert window.longest(t0 + 2 * LAG_WINDOW + 2) == 0.1  # the 2.0 window is over
    assert window.longest(t0 + 5 * LAG_WINDOW) == 0.0  # nothing settled for a while
    window.add(7.0, t0 + 5 * LAG_WINDOW)  # after a gap: the old windows are gone
    assert window.longest(t0 + 5 * LAG_WINDOW + 1) == 7.0
    assert window.previous == 0.0


def test_a_reader_once_a_window_sees_every_maximum() -> None:
    # A reader collecting every LAG_WINDOW seconds, at any phase, with no job after the
    # spike to roll the window: the spike is still reported once.
    for phase in (0.0, 0.3, 0.999):
        window = LagWindow()
        t0 = 1000 * LAG_WINDOW
        window.add(1.0, t0)
        reads = [t0 + (phase + k) * LAG_WINDOW for k in range(4)]
        assert window.longest(reads[0]) == 1.0
        window.add(70.0, reads[0] + 0.001)  # just after a read
        seen = [window.longest(read) for read in reads[1:]]
        assert seen[0] == 70.0, (phase, seen)
        assert seen[-1] == 0.0, (phase, seen)  # and gone once its windows are over


def test_a_reader_never_changes_the_window() -> None:
    window = LagWindow()
    window.add(3.0, 1000 * LAG_WINDOW)
    before = (window.index, window.current, window.previous)
    window.longest(1010 * LAG_WINDOW)
    assert (window.index, window.current, window.previous) == before


async def test_durations_carry_no_exemplar_even_inside_a_traced_job(otel: Otel) -> None:
    # An exemplar per record costs as much again as the record; the job's span is current
    # when the duration is recorded, so only the explicit context keeps the SDK off it.
    app = aioworkers.App("memory://", queue="exemplars")
    app.telemetry = otel.telemetry()

    @app.task
    async def fine() -> None:
        pass

    await app.enqueue_many(fine.call() for _ in range(3))
    async with app:
        await app.worker().run(burst=True)
    (point,) = otel.points("messaging.process.duration")
    assert point.count == 3
    assert len(otel.finished()) == 6  # the spans were recorded: 3 producer, 3 consumer
    assert list(point.exemplars) == []


async def test_enabled_false_records_nothing_whatever_the_providers(otel: Otel) -> None:
    app = aioworkers.App("memory://", queue="disabled")
    app.telemetry = Telemetry(
        meter_provider=otel.meter_provider, tracer_provider=otel.tracer_provider, enabled=False
    )
    assert app.telemetry.for_worker("memory", list) is None
    assert app.telemetry.producer("memory") is None
    assert repr(app.telemetry) == "<Telemetry off>"
    done = []

    @app.task
    async def fine() -> None:
        done.append(1)

    await fine.enqueue()
    async with app:
        await app.worker().run(burst=True)
    assert done == [1]
    assert otel.points("aioworkers.jobs") == []
    assert otel.points("messaging.process.duration") == []
    assert otel.finished() == []


async def test_the_lag_gauge_counts_fresh_jobs_only(otel: Otel) -> None:
    # A retry's wait includes its backoff: it must not read as a backlog.
    app = aioworkers.App("memory://", queue="lagged")
    app.telemetry = otel.telemetry()
    attempts = []

    @app.task(retries=1, backoff=0)
    async def flaky() -> None:
        attempts.append(aioworkers.current_job().attempt)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")

    original = time.time()
    await flaky.enqueue()
    async with app:
        worker = app.worker(poll=0.05)
        async with worker:
            for _ in range(100):
                if len(attempts) == 2:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
    assert attempts == [1, 2]
    (lag,) = otel.points("aioworkers.queue.lag")
    assert 0 <= lag.value < 0.5  # the first attempt's wait only
    metrics = Telemetry(meter_provider=otel.meter_provider).metrics()
    assert metrics is not None
    (window,) = metrics.lags.values()
    assert window.current == lag.value
    assert time.time() - original < 10


async def test_a_failing_span_start_runs_the_job_untraced(
    otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = aioworkers.App("memory://", queue="brokenspan")
    app.telemetry = otel.telemetry()
    done = []

    @app.task
    async def fine() -> None:
        done.append(1)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a broken sampler")

    await app.enqueue_many(fine.call() for _ in range(3))
    worker = app.worker(concurrency=1)
    assert worker._telemetry is not None
    monkeypatch.setattr(worker._telemetry, "start_attempt", broken)
    async with app:
        await worker.run(burst=True)
    assert done == [1, 1, 1]
    assert worker.counts == {"ok": 3}
    assert len(worker._inflight) == 0
