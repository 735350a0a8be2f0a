"""The producer side as the worker sees it: batched publishing, delays, argument checks at
enqueue time, and registering tasks."""

from __future__ import annotations

import pytest

from aioworkers import App, Call, ConfigError, QueueDepth, current_job
from aioworkers.envelope import decode
from aioworkers.testing import FakeClock

from .conftest import (
    POLL,
    FaultyBroker,
    advance_until,
    run_burst,
    running,
    stats_eventually,
)


async def test_enqueue_many_is_one_round_trip_per_queue_and_delay(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker

    @app.task
    async def a(n: int) -> None:
        pass

    @app.task(queue="other")
    async def b(n: int) -> None:
        pass

    calls = [
        a.call(0),
        b.call(1),
        a.options(delay=5).call(2),
        a.call(3),
        b.call(4),
        a.options(delay=5).call(5),
        a.options(queue="other").call(6),
        Call("a", (7,)),
    ]
    ids = await app.enqueue_many(calls)

    publishes = faulty.calls_of("publish")
    assert [(c.args[0], c.kwargs["delay"], len(c.args[1])) for c in publishes] == [
        ("default", 0.0, 3),
        ("other", 0.0, 3),
        ("default", 5, 2),
    ]
    # The returned ids are in the order of the calls, whatever the grouping.
    published = {}
    for call in publishes:
        for body in call.args[1]:
            env = decode(body)
            published[env.args[0]] = env.id
    assert ids == [published[n] for n in range(8)]
    assert len(set(ids)) == 8
    assert await app.stats() == QueueDepth(ready=3, delayed=2)
    assert await app.stats("other") == QueueDepth(ready=3)


async def test_enqueue_many_of_nothing_publishes_nothing(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker
    assert await app.enqueue_many([]) == []
    assert faulty.count("publish") == 0


async def test_enqueue_returns_the_job_id_the_handler_sees(app: App) -> None:
    seen: list[str] = []

    @app.task
    async def job() -> None:
        seen.append(current_job().id)

    by_task = await job.enqueue()
    by_name = await app.enqueue("job")
    await run_burst(app.worker(poll=POLL))
    assert sorted(seen) == sorted([by_task, by_name])


async def test_delayed_job_does_not_run_early(
    clocked: tuple[App, FaultyBroker, FakeClock],
) -> None:
    app, _, clock = clocked
    started: list[float] = []

    @app.task
    async def later() -> None:
        started.append(clock.monotonic())

    async with running(app.worker(poll=POLL, clock=clock), clock):
        t0 = clock.monotonic()
        await later.options(delay=0.3).enqueue()
        assert (await app.stats()).delayed == 1
        await advance_until(clock, lambda: len(started) == 1, step=0.01, what="the job")
    assert 0.3 <= started[0] - t0 <= 0.3 + 0.01 + 1e-9
    assert await app.stats() == QueueDepth()


async def test_delayed_and_immediate_jobs_mixed(app: App) -> None:
    order: list[str] = []

    @app.task
    async def tag(name: str) -> None:
        order.append(name)

    async with app.worker(poll=POLL):
        await app.enqueue_many([tag.options(delay=0.2).call("late"), tag.call("now")])
        await stats_eventually(app, QueueDepth(), within=2)
    assert order == ["now", "late"]


async def test_enqueue_with_bad_arguments_raises_at_the_producer(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker

    @app.task
    async def send(to: str, *, subject: str = "") -> None:
        pass

    with pytest.raises(TypeError, match="send"):
        await send.enqueue()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        await send.enqueue("a", "b")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        await send.enqueue("a", body="x")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        await app.enqueue("send", kwargs={"nope": 1})
    with pytest.raises(TypeError):
        send.call("a", "b")  # type: ignore[call-arg]
    # A batch with one bad call publishes nothing.
    with pytest.raises(TypeError):
        await app.enqueue_many([send.call("a"), Call("send", ("a", "b"))])
    # Arguments that cannot travel as JSON fail at the producer too.
    with pytest.raises(TypeError):
        await send.enqueue(object())  # type: ignore[arg-type]
    # NaN would arrive as None: refused, in a batch too.
    with pytest.raises(ValueError, match="finite"):
        await app.enqueue_many([send.call("a"), Call("send", ("a",), {"subject": float("nan")})])
    assert faulty.count("publish") == 0
    assert await app.stats() == QueueDepth()


async def test_negative_delay_is_refused(app: App) -> None:
    @app.task
    async def job() -> None:
        pass

    with pytest.raises(ConfigError, match="delay"):
        job.options(delay=-1)
    with pytest.raises(ConfigError, match="delay"):
        await app.enqueue("job", delay=-1)


def test_a_plain_def_is_a_sync_task(app: App) -> None:
    # Sync handlers run in worker threads (tests/handlers/test_sync.py).
    def plain() -> None:
        pass

    task = app.task(plain)
    assert app.tasks == {"plain": task}
    assert task.handler is not None
    assert task.handler.sync


def test_duplicate_task_name_is_a_config_error(app: App) -> None:
    @app.task
    async def job() -> None:
        pass

    with pytest.raises(ConfigError, match="already registered"):

        @app.task(name="job")
        async def other() -> None:
            pass


async def test_calling_a_task_runs_the_coroutine(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker

    @app.task(retries=1)
    async def add(a: int, b: int = 1) -> int:
        return a + b

    assert await add(2) == 3
    assert await add(2, b=5) == 7
    assert faulty.count("publish") == 0
