"""Job handles, results, cancel and snooze in one process: on the memory broker and store
(a fake clock where time matters) and on a SQLite file (broker and store)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

import pytest

import aioworkers
from aioworkers import App, ConfigError, JobCancelled, JobFailed, ResultUnavailable, Snooze
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.envelope import peek_id
from aioworkers.store import MemoryStore, StoreUnavailable
from aioworkers.testing import FakeClock

from ..runtime.conftest import advance_until, run_burst, running

LEASE = 3.0  # the beat reads cancel marks every LEASE / 3 seconds of the clock


def fake_app(clock: FakeClock, **kwargs: Any) -> App:
    broker = MemoryBroker(visibility_timeout=LEASE, clock=clock)
    return App(broker, visibility_timeout=LEASE, store=MemoryStore(clock=clock), **kwargs)


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with App("memory://") as app:
        yield app


async def test_a_result_round_trips(app: App) -> None:
    @app.task(result_ttl=3600)
    async def add(a: int, b: int) -> dict[str, int]:
        return {"sum": a + b}

    job = await add.enqueue(2, 3)
    assert isinstance(job, aioworkers.JobHandle)
    assert (job.task, job.queue) == ("add", "default")
    assert job == job.id
    assert isinstance(job, str)
    assert await job.status() == "queued"  # written at enqueue: never "not found"
    await run_burst(app.worker())
    assert await job.result(timeout=5) == {"sum": 5}
    info = await job.info()
    assert (info.id, info.task, info.queue, info.status, info.attempt) == (
        job.id,
        "add",
        "default",
        "succeeded",
        1,
    )
    assert info.enqueued_at is not None
    assert info.started_at is not None
    assert info.finished_at is not None
    assert info.finished_at >= info.started_at
    assert await app.job(job.id).result() == {"sum": 5}  # a handle from the id alone


async def test_enqueue_many_returns_handles_and_the_app_default_ttl() -> None:
    async with App("memory://", result_ttl=3600) as app:

        @app.task
        async def echo(x: int) -> int:
            return x

        jobs = await app.enqueue_many([echo.call(i) for i in range(3)])
        assert all(isinstance(j, aioworkers.JobHandle) for j in jobs)
        await run_burst(app.worker())
        assert [await j.result() for j in jobs] == [0, 1, 2]


async def test_a_failure_raises_job_failed(app: App) -> None:
    @app.task(result_ttl=3600, retries=0)
    async def boom() -> None:
        raise ValueError("bad input")

    job = await boom.enqueue()
    await run_burst(app.worker())
    with pytest.raises(JobFailed) as failed:
        await job.result()
    assert failed.value.error_type == "ValueError"
    assert "bad input" in failed.value.error
    assert "raise ValueError" in failed.value.traceback
    assert await job.status() == "failed"


async def test_without_result_ttl_nothing_is_kept(app: App) -> None:
    @app.task
    async def plain() -> int:
        return 1

    job = await plain.enqueue()
    with pytest.raises(ResultUnavailable, match="result_ttl"):
        await job.result()
    assert await job.status() == "unknown"
    assert await app.job("0" * 32).status() == "unknown"
    with pytest.raises(ResultUnavailable):
        await app.job("0" * 32).result()


async def test_result_waits_then_times_out(app: App) -> None:
    @app.task(result_ttl=3600)
    async def later() -> str:
        return "done"

    job = await later.enqueue()
    with pytest.raises(TimeoutError):
        await job.result(timeout=0.05)
    waiter = asyncio.create_task(job.result(timeout=5))
    await run_burst(app.worker())
    assert await waiter == "done"


async def test_a_result_that_cannot_be_kept_still_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with App("memory://", max_result_size=100) as app:

        @app.task(result_ttl=3600)
        async def odd() -> object:
            return {1, 2}  # a set: not JSON

        @app.task(result_ttl=3600)
        async def big() -> str:
            return "x" * 1000

        jobs = [await odd.enqueue(), await big.enqueue()]
        with caplog.at_level(logging.WARNING, logger="aioworkers"):
            await run_burst(app.worker())
        for job, why in zip(jobs, ["not JSON-serializable", "over max_result_size"], strict=True):
            assert await job.status() == "succeeded"
            with pytest.raises(ResultUnavailable, match=why):
                await job.result()
        assert sum("result is not stored" in r.getMessage() for r in caplog.records) == 2


async def test_status_queued_running_succeeded(app: App) -> None:
    inside, go = asyncio.Event(), asyncio.Event()

    @app.task(result_ttl=3600)
    async def step() -> int:
        inside.set()
        await go.wait()
        return 7

    job = await step.enqueue()
    assert await job.status() == "queued"
    async with app.worker():
        await asyncio.wait_for(inside.wait(), 5)
        assert await job.status() == "running"
        go.set()
        assert await job.result(timeout=5) == 7
    assert await job.status() == "succeeded"


async def test_status_queued_retrying_failed() -> None:
    clock = FakeClock()
    app = fake_app(clock)
    seen: list[str] = []

    @app.task(result_ttl=3600, retries=1, backoff=10, max_backoff=10)
    async def flaky() -> None:
        raise RuntimeError("down")

    job = await flaky.enqueue()
    seen.append(await job.status())
    async with running(app.worker(clock=clock), clock) as worker:
        await advance_until(clock, lambda: worker.counts.get("retried", 0) == 1)
        seen.append(await job.status())
        await advance_until(clock, lambda: worker.counts.get("dead", 0) == 1, within=30)
        seen.append(await job.status())
    assert seen == ["queued", "retrying", "failed"]
    info = await job.info()
    assert (info.attempt, info.error_type) == (2, "RuntimeError")


@pytest.mark.parametrize("result_ttl", [3600, None])
@pytest.mark.parametrize("delay", [0.0, 30.0])
async def test_a_cancelled_queued_or_delayed_job_never_starts(
    result_ttl: float | None, delay: float
) -> None:
    clock = FakeClock()
    app = fake_app(clock)
    ran: list[int] = []

    @app.task(result_ttl=result_ttl)
    async def work() -> None:
        ran.append(1)

    job = await work.options(delay=delay).enqueue()
    if result_ttl:
        assert await job.status() == ("delayed" if delay else "queued")
    assert await job.cancel() is True
    async with running(app.worker(clock=clock), clock) as worker:
        await advance_until(clock, lambda: worker.counts.get("cancelled", 0) == 1, within=60)
    assert ran == []
    assert (await app.stats()).ready == 0
    if result_ttl:
        assert await job.status() == "cancelled"
        with pytest.raises(JobCancelled):
            await job.result()
        assert await job.cancel() is False  # finished: nothing to cancel


async def test_a_cancelled_retrying_job_never_runs_again() -> None:
    clock = FakeClock()
    app = fake_app(clock)
    runs: list[int] = []

    @app.task(result_ttl=3600, retries=5, backoff=20, max_backoff=20)
    async def flaky() -> None:
        runs.append(1)
        raise RuntimeError("down")

    job = await flaky.enqueue()
    async with running(app.worker(clock=clock), clock) as worker:
        await advance_until(clock, lambda: worker.counts.get("retried", 0) == 1)
        assert await job.status() == "retrying"
        assert await app.cancel(job.id) is True
        await advance_until(clock, lambda: worker.counts.get("cancelled", 0) == 1, within=60)
        await clock.advance(60)
    assert runs == [1]
    assert worker.counts.get("dead", 0) == 0
    assert await job.status() == "cancelled"


@pytest.mark.parametrize("result_ttl", [3600, None])
async def test_a_running_job_stops_within_one_lease_interval(result_ttl: float | None) -> None:
    clock = FakeClock()
    app = fake_app(clock)
    started, cleaned = asyncio.Event(), asyncio.Event()
    runs: list[int] = []

    @app.task(result_ttl=result_ttl, retries=3)
    async def forever() -> None:
        runs.append(1)
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaned.set()
            raise

    job = await forever.enqueue()
    async with running(app.worker(clock=clock), clock) as worker:
        await asyncio.wait_for(started.wait(), 5)
        assert await job.cancel() is True
        took = await advance_until(clock, cleaned.is_set, step=0.1)
        assert took <= LEASE / 3 + 0.1
        await advance_until(clock, lambda: worker.counts.get("cancelled", 0) == 1)
        await clock.advance(5 * LEASE)  # no redelivery, no retry
    assert runs == [1]
    assert worker.counts.get("retried", 0) == worker.counts.get("dead", 0) == 0
    assert (await app.stats()).ready == (await app.stats()).in_flight == 0
    if result_ttl:
        assert await job.status() == "cancelled"


async def test_a_cancel_racing_completion_ends_as_exactly_one(app: App) -> None:
    @app.task(result_ttl=3600)
    async def quick(i: int) -> int:
        await asyncio.sleep(0)
        return i

    jobs = await app.enqueue_many([quick.call(i) for i in range(40)])
    async with app.worker(concurrency=8):
        answers = await asyncio.gather(*(j.cancel() for j in jobs[::2]))
        for job in jobs:
            with contextlib.suppress(JobCancelled):
                await job.result(timeout=10)
    statuses = [await j.status() for j in jobs]
    assert set(statuses) <= {"succeeded", "cancelled"}
    for job, answer in zip(jobs[::2], answers, strict=True):
        if not answer:  # too late: it had finished
            assert await job.status() == "succeeded"
    assert all(s == "succeeded" for s in statuses[1::2])


async def test_unknown_ids_cancel_nothing(app: App) -> None:
    @app.task(result_ttl=3600)
    async def t() -> None:
        pass

    assert await app.cancel("nope") is False
    assert await app.cancel("0" * 32) is False  # the form of an id, but no record


async def test_snooze_keeps_the_attempt() -> None:
    clock = FakeClock()
    app = fake_app(clock)

    @app.task(result_ttl=3600, retries=0)
    async def poll() -> list[int]:
        job = aioworkers.current_job()
        if job.snoozes < 3:
            raise Snooze(5)
        return [job.attempt, job.snoozes]

    job = await poll.enqueue()
    async with running(app.worker(clock=clock), clock) as worker:
        await advance_until(clock, lambda: worker.counts.get("ok", 0) == 1, within=60)
    assert worker.counts["snoozed"] == 3
    assert await app.job(job.id).status() == "succeeded"
    record = await app.store.get_job(job.id)
    assert record is not None
    assert record.result == b"[1,3]"


async def test_max_snoozes_dead_letters() -> None:
    clock = FakeClock()
    app = fake_app(clock)

    @app.task(max_snoozes=2)
    async def never() -> None:
        raise Snooze(1)

    await never.enqueue()
    async with running(app.worker(clock=clock), clock) as worker:
        await advance_until(clock, lambda: worker.counts.get("dead", 0) == 1, within=60)
    assert worker.counts["snoozed"] == 2
    (letter,) = await app.dlq().list()
    assert letter.reason == "max_snoozes"


async def test_an_idempotent_duplicate_returns_the_first_result(app: App) -> None:
    runs: list[int] = []

    @app.task(idempotent=True, result_ttl=3600)
    async def charge(amount: int) -> str:
        runs.append(amount)
        return f"charged {amount} (run {len(runs)})"

    first = await charge.options(key="order-1").enqueue(10)
    await run_burst(app.worker())
    second = await charge.options(key="order-1").enqueue(10)
    await run_burst(app.worker())
    assert runs == [10]
    assert await first.result() == await second.result() == "charged 10 (run 1)"


async def test_sqlite_broker_and_store(tmp_path: Path) -> None:
    async with App(f"sqlite:///{tmp_path}/jobs.db") as app:

        @app.task(result_ttl=3600)
        async def double(x: int) -> int:
            return 2 * x

        job = await double.enqueue(21)
        cancelled = await double.enqueue(1)
        assert await cancelled.cancel() is True
        await run_burst(app.worker())
        assert await job.result() == 42
        assert await cancelled.status() == "cancelled"
    # Another App on the same file (another process would do the same): the id is enough.
    async with App(f"sqlite:///{tmp_path}/jobs.db") as other:
        assert await other.job(job.id).result() == 42


@pytest.mark.parametrize("url", ["amqp://guest:guest@127.0.0.1:5672/", "sqs://"])
async def test_no_store_no_results(url: str) -> None:
    app = App(url)

    @app.task(result_ttl=3600)
    async def t() -> None:
        pass

    with pytest.raises(ConfigError, match="store="):
        app.worker()
    with pytest.raises(ConfigError, match="store="):
        await app.cancel("0" * 32)


class MarksDown(MemoryStore):
    """A store whose cancel marks cannot be read (the rest works)."""

    async def cancelled(self, job_ids: Collection[str]) -> set[str]:
        raise StoreUnavailable("injected: marks unreadable")


async def test_unreadable_cancel_marks_let_jobs_run(caplog: pytest.LogCaptureFixture) -> None:
    async with App("memory://", store=MarksDown()) as app:
        ran: list[int] = []

        @app.task
        async def work() -> None:
            ran.append(1)

        await work.enqueue()
        with caplog.at_level(logging.WARNING, logger="aioworkers"):
            await run_burst(app.worker())
        assert ran == [1]
        assert any("unchecked for cancel marks" in r.getMessage() for r in caplog.records)


def test_peek_id_reads_only_a_string_id() -> None:
    assert peek_id(b'{"id": "abc", "v": 1}') == "abc"
    for body in (b"[]", b'{"id": 5}', b"not json", b'{"v": 1}'):
        assert peek_id(body) is None
