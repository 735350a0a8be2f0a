"""What a failed attempt leads to: retries with backoff, `Retry`, `Reject`, timeouts, and
the dead-letter record at the end."""

from __future__ import annotations

import asyncio

from aioworkers import App, QueueDepth, Reject, Retry, current_job
from aioworkers.testing import FakeClock

from .conftest import POLL, FaultyBroker, MakeApp, advance_until, run_burst


async def test_always_failing_task_is_dead_lettered_after_retries_plus_one(app: App) -> None:
    attempts: list[int] = []
    seen_ids: set[str] = set()

    @app.task(retries=3, backoff=0.01)
    async def boom(x: int) -> None:
        attempts.append(current_job().attempt)
        seen_ids.add(current_job().id)
        raise ValueError(f"boom {x}")

    job_id = await boom.enqueue(7)
    worker = app.worker(poll=POLL)
    await run_burst(worker)

    assert attempts == [1, 2, 3, 4]
    assert seen_ids == {job_id}
    assert worker.counts == {"retried": 3, "dead": 1}
    assert await app.stats() == QueueDepth(dead=1)
    (letter,) = await app.dlq().list()
    assert letter.id == job_id
    assert letter.task == "boom"
    assert letter.reason == "max_retries"
    assert letter.attempts == 4
    assert letter.error_type == "ValueError"
    assert letter.error is not None
    assert "boom 7" in letter.error
    assert letter.traceback is not None
    assert "ValueError: boom 7" in letter.traceback
    assert "in boom" in letter.traceback
    assert letter.queue == "default"


async def test_zero_retries_means_one_attempt(app: App) -> None:
    attempts: list[int] = []

    @app.task(retries=0)
    async def once() -> None:
        attempts.append(current_job().attempt)
        raise RuntimeError("no")

    await once.enqueue()
    await run_burst(app.worker(poll=POLL))

    assert attempts == [1]
    (letter,) = await app.dlq().list()
    assert (letter.reason, letter.attempts) == ("max_retries", 1)


async def test_a_retry_that_succeeds_is_acked(app: App) -> None:
    attempts: list[int] = []

    @app.task(retries=5, backoff=0.01)
    async def flaky() -> None:
        attempts.append(current_job().attempt)
        if len(attempts) < 3:
            raise ConnectionError("try again")

    await flaky.enqueue()
    worker = app.worker(poll=POLL)
    await run_burst(worker)

    assert attempts == [1, 2, 3]
    assert worker.counts == {"retried": 2, "ok": 1}
    assert await app.stats() == QueueDepth()
    assert await app.dlq().list() == []


async def test_reject_dead_letters_at_once(app: App) -> None:
    attempts: list[int] = []

    @app.task(retries=5)
    async def picky() -> None:
        attempts.append(current_job().attempt)
        raise Reject("why")

    job_id = await picky.enqueue()
    worker = app.worker(poll=POLL)
    await run_burst(worker)

    assert attempts == [1]
    assert worker.counts == {"dead": 1}
    (letter,) = await app.dlq().list()
    assert (letter.id, letter.task, letter.reason, letter.attempts) == (
        job_id,
        "picky",
        "rejected",
        1,
    )
    assert letter.error_type == "Reject"
    assert letter.error is not None
    assert "why" in letter.error


async def test_retry_delay_is_honoured(make_app: MakeApp, clock: FakeClock) -> None:
    app, faulty = make_app(clock=clock)
    starts: list[float] = []

    @app.task(retries=3, backoff=100.0)
    async def later() -> None:
        starts.append(clock.monotonic())
        if current_job().attempt == 1:
            raise Retry(delay=0.3)

    await later.enqueue()
    worker = app.worker(poll=POLL, clock=clock)
    run = asyncio.create_task(worker.run(burst=True))
    await advance_until(clock, run.done, what="the burst to end")
    await run

    assert len(starts) == 2
    gap = starts[1] - starts[0]
    # Run again once its delay was over, not before, and not much later.
    assert 0.3 <= gap <= 0.3 + 2 * POLL
    assert worker.counts == {"retried": 1, "ok": 1}
    (retry,) = faulty.calls_of("retry")
    assert retry.kwargs["delay"] == 0.3


async def test_retry_without_delay_uses_the_backoff(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker
    attempts: list[int] = []

    @app.task(retries=2, backoff=0.02, max_backoff=0.03)
    async def again() -> None:
        attempts.append(current_job().attempt)
        raise Retry()

    await again.enqueue()
    await run_burst(app.worker(poll=POLL))

    # A Retry counts as an attempt: the retries run out and the job is dead-lettered.
    assert attempts == [1, 2, 3]
    delays = [c.kwargs["delay"] for c in faulty.calls_of("retry")]
    assert len(delays) == 2
    assert 0 <= delays[0] <= 0.02
    assert 0 <= delays[1] <= 0.03
    (letter,) = await app.dlq().list()
    assert letter.reason == "max_retries"


async def test_timeout_is_retried_then_dead_lettered(app: App) -> None:
    attempts: list[int] = []
    finished: list[int] = []

    @app.task(retries=1, timeout=0.1, backoff=0)
    async def slow() -> None:
        attempts.append(current_job().attempt)
        await asyncio.sleep(2)
        finished.append(current_job().attempt)

    job_id = await slow.enqueue()
    worker = app.worker(poll=POLL)
    await run_burst(worker)

    # Cut by the timeout: a handler left to its 2 s would have finished (real time, as
    # a task's timeout is on the loop's own timer).
    assert attempts == [1, 2]
    assert finished == []
    assert worker.counts == {"retried": 1, "dead": 1}
    (letter,) = await app.dlq().list()
    assert (letter.id, letter.reason, letter.attempts) == (job_id, "max_retries", 2)
    assert letter.error_type == "TimeoutError"
    assert letter.error is not None
    assert "TimeoutError" in letter.error
    assert "0.1" in letter.error


async def test_timeout_then_success(app: App) -> None:
    attempts: list[int] = []

    @app.task(retries=2, timeout=0.1, backoff=0)
    async def sometimes_slow() -> None:
        attempts.append(current_job().attempt)
        if current_job().attempt == 1:
            await asyncio.sleep(2)

    await sometimes_slow.enqueue()
    worker = app.worker(poll=POLL)
    await run_burst(worker)

    assert attempts == [1, 2]
    assert worker.counts == {"retried": 1, "ok": 1}
    assert await app.stats() == QueueDepth()


async def test_failures_of_one_job_do_not_disturb_others(app: App) -> None:
    done: list[int] = []

    @app.task(retries=1, backoff=0)
    async def maybe(n: int) -> None:
        if n % 3 == 0:
            raise RuntimeError(f"bad {n}")
        done.append(n)

    await app.enqueue_many([maybe.call(n) for n in range(30)])
    worker = app.worker(concurrency=5, poll=POLL)
    await run_burst(worker)

    assert sorted(done) == [n for n in range(30) if n % 3]
    assert worker.counts == {"ok": 20, "retried": 10, "dead": 10}
    letters = await app.dlq().list()
    assert sorted(letter.error or "" for letter in letters) == sorted(
        f"RuntimeError: bad {n}" for n in range(0, 30, 3)
    )
