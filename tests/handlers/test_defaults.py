"""Safe defaults: the default retry policy rides out a ten-minute outage (its schedule
computed on a fake clock), overridable per app and per task; ``delay=None`` is no delay,
and a negative, NaN or infinite delay is a `ConfigError` naming the argument."""

from __future__ import annotations

import asyncio
import math

import pytest

from aioworkers import App, ConfigError, Retry, Snooze
from aioworkers._runtime.outcome import RetryLater
from aioworkers._runtime.policy import DEFAULT_POLICY, Policy, classify, retry_delay
from aioworkers.task import Call
from aioworkers.testing import FakeClock

from ..runtime.conftest import POLL, MakeApp, advance_until

OUTAGE = 600.0  # ten minutes
SLOW_POLL = 5.0
STEP = 5.0


def test_the_default_schedule_spans_more_than_a_ten_minute_outage() -> None:
    # The least and the most each pause can be (the README shows this table).
    low = [retry_delay(n, DEFAULT_POLICY, lambda: 0.0) for n in range(1, 9)]
    high = [retry_delay(n, DEFAULT_POLICY, lambda: 1.0) for n in range(1, 9)]
    assert low == [5, 10, 20, 40, 80, 160, 320, 640]
    assert high == [10, 20, 40, 80, 160, 320, 640, 1280]
    assert sum(low) == 1275 > 2 * OUTAGE
    assert sum(high) == 2550
    assert DEFAULT_POLICY.retries == 8
    last = classify(RuntimeError(), 9, DEFAULT_POLICY)
    assert not isinstance(last, RetryLater)  # the ninth attempt is the last


async def test_a_job_failing_through_a_ten_minute_outage_still_succeeds(
    make_app: MakeApp, clock: FakeClock
) -> None:
    app, _ = make_app(clock=clock)
    start = clock.monotonic()
    attempts: list[float] = []

    @app.task  # the default policy
    async def call_partner() -> None:
        attempts.append(clock.monotonic() - start)
        if clock.monotonic() - start < OUTAGE:
            raise ConnectionError("partner down")

    await call_partner.enqueue()
    # A long poll: the clock moves by minutes, and an idle fetch wakes once a poll.
    worker = app.worker(poll=SLOW_POLL, clock=clock)
    run = asyncio.create_task(worker.run())
    await advance_until(clock, lambda: worker.counts.get("ok", 0) == 1, step=STEP, within=3000)
    worker.stop()
    await advance_until(clock, run.done, what="the worker to stop")
    assert worker.counts.get("dead", 0) == 0
    assert attempts[-1] >= OUTAGE
    assert 2 <= len(attempts) <= 9


async def test_a_job_that_always_fails_is_dead_lettered_after_the_whole_schedule(
    make_app: MakeApp, clock: FakeClock
) -> None:
    app, _ = make_app(clock=clock)
    start = clock.monotonic()
    attempts: list[float] = []

    @app.task
    async def always() -> None:
        attempts.append(clock.monotonic() - start)
        raise ConnectionError("down for good")

    await always.enqueue()
    worker = app.worker(poll=SLOW_POLL, clock=clock)
    run = asyncio.create_task(worker.run())
    await advance_until(clock, lambda: worker.counts.get("dead", 0) == 1, step=STEP, within=3000)
    worker.stop()
    await advance_until(clock, run.done, what="the worker to stop")
    assert len(attempts) == 9
    assert 1275 <= attempts[-1] <= 2550 + 9 * (STEP + SLOW_POLL)  # each retry: a step late


def test_the_policy_is_overridable_per_app_and_per_task() -> None:
    app = App("memory://", retries=2, backoff=0.5, max_backoff=4.0)

    @app.task
    async def by_app() -> None: ...

    @app.task(retries=0)
    async def by_task() -> None: ...

    @app.task(backoff=0.0, timeout=3)
    async def partly() -> None: ...

    assert by_app.policy == Policy(retries=2, backoff=0.5, max_backoff=4.0)
    assert by_task.policy == Policy(retries=0, backoff=0.5, max_backoff=4.0)
    assert partly.policy == Policy(retries=2, backoff=0.0, max_backoff=4.0, timeout=3)
    assert App("memory://").tasks == {}
    assert App("memory://").retry_policy == DEFAULT_POLICY


@pytest.mark.parametrize(
    "kwargs", [{"retries": -1}, {"backoff": -1.0}, {"max_backoff": math.inf}, {"backoff": math.nan}]
)
def test_a_bad_policy_is_a_config_error(kwargs: dict[str, float]) -> None:
    (what,) = kwargs
    with pytest.raises(ConfigError, match=what):
        App("memory://", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=what):
        App("memory://").task(**kwargs)  # type: ignore[call-overload]


async def test_delay_none_is_no_delay_everywhere() -> None:
    app = App("memory://")
    ran: list[int] = []

    @app.task
    async def job(n: int) -> None:
        ran.append(n)

    await job.options(delay=None).enqueue(1)
    await app.enqueue("job", args=[2], delay=None)
    await app.enqueue_many([Call("job", (3,), delay=None), job.options(delay=None).call(4)])
    assert (await app.stats()).ready == 4
    async with asyncio.timeout(10):
        await app.worker(poll=POLL).run(burst=True)
    assert sorted(ran) == [1, 2, 3, 4]


@pytest.mark.parametrize("bad", [-1, -0.001, math.nan, math.inf, -math.inf, "5", True])
async def test_a_bad_delay_is_a_config_error_naming_it(bad: object) -> None:
    app = App("memory://")

    @app.task
    async def job() -> None: ...

    with pytest.raises(ConfigError, match=r"delay must be .*(finite|number)"):
        job.options(delay=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="delay"):
        await app.enqueue("job", delay=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="delay"):
        Call("job", delay=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"Retry\(delay=\)"):
        Retry(delay=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"Snooze\(delay=\)"):
        Snooze(bad)  # type: ignore[arg-type]
    assert (await app.stats()).ready == 0


def test_retry_without_a_delay_keeps_the_tasks_backoff() -> None:
    assert Retry().delay is None
    assert Snooze(None).delay == 0.0
