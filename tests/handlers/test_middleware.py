"""Middleware around every attempt (worker and Lambda adapter), and producer-side
``on_enqueue`` headers that arrive in ``current_job().headers``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import aioworkers
from aioworkers import App, ConfigError, Job, Reject, Retry, Snooze, current_job
from aioworkers.task import Call

from ..runtime.conftest import POLL, MakeApp, run_burst

CallNext = Callable[..., Awaitable[Any]]


async def test_middleware_runs_in_registration_order_around_the_handler(
    make_app: MakeApp,
) -> None:
    app, _ = make_app()
    order: list[str] = []

    @app.middleware
    async def outer(job: Job, call_next: CallNext) -> Any:
        order.append(f"outer:{job.task}")
        result = await call_next()
        order.append(f"outer got {result}")
        return result

    @app.middleware
    async def inner(job: Job, call_next: CallNext) -> Any:
        order.append("inner")
        assert current_job() is job
        try:
            return await call_next(job)  # given the job back: the same
        finally:
            order.append("inner done")

    @app.task
    async def add(a: int, b: int) -> int:
        order.append("handler")
        return a + b

    await add.enqueue(1, 2)
    await run_burst(app.worker(poll=POLL))
    assert order == ["outer:add", "inner", "handler", "inner done", "outer got 3"]


async def test_a_middleware_may_short_circuit(make_app: MakeApp) -> None:
    app, _ = make_app()
    ran: list[int] = []

    @app.middleware
    async def skip_tenant_b(job: Job, call_next: CallNext) -> Any:
        if job.headers.get("tenant") == "b":
            return None  # done without running the handler
        return await call_next()

    @app.on_enqueue
    def tenant(call: Call, headers: dict[str, str]) -> None:
        headers["tenant"] = "b" if call.args == (2,) else "a"

    @app.task
    async def work(n: int) -> None:
        ran.append(n)

    await app.enqueue_many([work.call(1), work.call(2)])
    worker = app.worker(poll=POLL)
    await run_burst(worker)
    assert ran == [1]
    assert worker.counts["ok"] == 2


@pytest.mark.parametrize(
    ("raised", "reason"),
    [(RuntimeError("sentry down"), "max_retries"), (Reject("no tenant"), "rejected")],
)
async def test_a_middlewares_error_fails_the_attempt(
    make_app: MakeApp, raised: Exception, reason: str
) -> None:
    app, _ = make_app(retries=0)
    ran: list[int] = []

    @app.middleware
    async def broken(job: Job, call_next: CallNext) -> Any:
        raise raised

    @app.task
    async def work() -> None:
        ran.append(1)

    await work.enqueue()
    await run_burst(app.worker(poll=POLL))
    (letter,) = await app.dlq().list()
    assert letter.reason == reason
    assert letter.error_type == type(raised).__name__
    assert ran == []


async def test_a_middleware_may_ask_for_a_retry(make_app: MakeApp) -> None:
    app, _faulty = make_app()
    attempts: list[int] = []

    @app.middleware
    async def once_more(job: Job, call_next: CallNext) -> Any:
        if job.attempt == 1:
            raise Retry(delay=0)
        return await call_next()

    @app.task
    async def work() -> None:
        attempts.append(current_job().attempt)

    await work.enqueue()
    worker = app.worker(poll=POLL)
    await run_burst(worker)
    assert attempts == [2]
    assert worker.counts["retried"] == 1
    assert worker.counts["ok"] == 1


async def test_a_middleware_sees_the_handlers_error(make_app: MakeApp) -> None:
    app, _ = make_app(retries=0)
    caught: list[str] = []

    @app.middleware
    async def report(job: Job, call_next: CallNext) -> Any:
        try:
            return await call_next()
        except Exception as exc:
            caught.append(f"{job.task}: {exc}")
            raise

    @app.task
    async def work() -> None:
        raise ValueError("bad")

    await work.enqueue()
    await run_burst(app.worker(poll=POLL))
    assert caught == ["work: bad"]
    assert [d.reason for d in await app.dlq().list()] == ["max_retries"]


async def test_async_on_enqueue_headers_arrive_in_current_job() -> None:
    app = App("memory://")
    seen: list[dict[str, str]] = []

    @app.on_enqueue
    async def correlate(call: Call, headers: dict[str, str]) -> None:
        headers["correlation-id"] = f"c-{call.task}"

    @app.task
    async def work() -> None:
        seen.append(current_job().headers)

    await work.enqueue()
    await run_burst(app.worker(poll=POLL))
    assert seen[0]["correlation-id"] == "c-work"


async def test_on_enqueue_headers_must_be_str() -> None:
    app = App("memory://")

    @app.on_enqueue
    def bad(call: Call, headers: dict[str, str]) -> None:
        headers["n"] = 1  # type: ignore[assignment]

    @app.task
    async def work() -> None:
        pass

    with pytest.raises(TypeError, match="str"):
        await work.enqueue()
    assert (await app.stats()).ready == 0


def test_a_middleware_must_be_async() -> None:
    app = App("memory://")

    def sync_mw(job: Job, call_next: CallNext) -> Any:
        return None

    with pytest.raises(ConfigError, match="async def"):
        app.middleware(sync_mw)  # type: ignore[arg-type]


async def test_the_lambda_adapter_runs_the_same_middleware() -> None:
    app = App("memory://")
    order: list[str] = []

    @app.middleware
    async def scope(job: Job, call_next: CallNext) -> Any:
        order.append(f"mw {job.headers.get('tenant')}")
        return await call_next()

    @app.task
    async def greet(name: str) -> None:
        order.append(f"greet {name}")

    body = (
        b'{"v":1,"id":"job-1","task":"greet","args":["a"],"kwargs":{},"attempt":1,'
        b'"enqueued_at":1700000000000,"headers":{"tenant":"t1"}}'
    )
    record = {
        "messageId": "m-1",
        "body": body.decode(),
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {},
        "eventSourceARN": "arn:aws:sqs:eu-west-1:123456789012:default",
    }
    result = await aioworkers.lambda_handler(app).handle({"Records": [record]})
    assert result == {"batchItemFailures": []}
    assert order == ["mw t1", "greet a"]


async def test_a_middleware_may_snooze_the_job(make_app: MakeApp) -> None:
    app, _ = make_app()
    seen: list[tuple[int, int]] = []

    @app.middleware
    async def not_yet(job: Job, call_next: CallNext) -> Any:
        if job.snoozes == 0:
            raise Snooze(0)  # same attempt, later
        return await call_next()

    @app.task
    async def work() -> None:
        job = current_job()
        seen.append((job.attempt, job.snoozes))

    await work.enqueue()
    worker = app.worker(poll=POLL)
    await run_burst(worker)
    assert seen == [(1, 1)]
    assert worker.counts["snoozed"] == 1
