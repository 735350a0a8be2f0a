"""Faults of the Lambda adapter on events received from moto (hardening #11, items 4 and 13):
idempotency claims and record visibility kept while a job runs, and records with malformed
attributes dead-lettered with a reason instead of failing every invocation."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

import aioworkers
from aioworkers.envelope import Envelope, encode
from aioworkers.serverless import _event_loop

from ..services import REDIS, REDIS_URL, delete_prefix, ensure, moto_endpoint, sqs_url
from .lambda_events import Context, delete_done, queue_url, receive_event, run, send_raw

pytest.importorskip("aiobotocore")


@pytest.fixture
def loop_errors() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """What reached the adapter's loop's exception handler ("Task exception was never
    retrieved" and the like): must stay empty."""
    loop = _event_loop()
    seen: list[dict[str, Any]] = []

    def errors() -> list[dict[str, Any]]:
        gc.collect()  # an unretrieved task exception is reported when its task is freed
        return seen

    loop.set_exception_handler(lambda _, context: seen.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(None)


@pytest.fixture
def app() -> Iterator[aioworkers.App]:
    app = aioworkers.App(sqs_url(moto_endpoint()), queue=f"lambda-{uuid.uuid4().hex[:12]}")
    try:
        yield app
    finally:
        run(app.aclose())


def job(task: str, *args: Any) -> str:
    return encode(Envelope(id=uuid.uuid4().hex, task=task, args=list(args), kwargs={})).decode()


# Each: message attributes (or, for "count", the ApproximateReceiveCount Lambda reports),
# the body, and the reason of the dead letter.
MALFORMED = {
    "base_not_a_number": ({"aw-base": "many"}, None, "schema_error"),
    "base_negative": ({"aw-base": "-3"}, None, "schema_error"),
    "base_huge": ({"aw-base": "9" * 30}, None, "schema_error"),
    "body_not_base64": ({"aw-enc": "b64"}, "not base64 at all!", "decode_error"),
    "body_base64_not_ascii": ({"aw-enc": "b64"}, "ünïcode", "decode_error"),
    "body_base64_with_junk": ({"aw-enc": "b64"}, "e30=!!", "decode_error"),
    "body_encoding_unknown": ({"aw-enc": "gzip"}, "H4sI", "decode_error"),
    "eta_not_a_number": ({"aw-eta": "soon"}, None, "schema_error"),
    "eta_not_finite": ({"aw-eta": "nan"}, None, "schema_error"),
    "count_not_a_number": ({"count": "lots"}, None, "schema_error"),
    "count_zero": ({"count": "0"}, None, "schema_error"),
    "count_negative": ({"count": "-1"}, None, "schema_error"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_record_with_a_malformed_attribute_is_dead_lettered_and_the_batch_succeeds(
    app: aioworkers.App, loop_errors: Callable[[], list[dict[str, Any]]], case: str
) -> None:
    attributes, body, reason = MALFORMED[case]
    ran: list[int] = []

    @app.task
    async def ok(n: int) -> None:
        ran.append(n)

    count = attributes.pop("count", None)
    text = job("ok", 2) if body is None else body

    async def enqueue() -> tuple[dict[str, Any], str]:
        await ok.enqueue(1)  # first: it creates the queue
        bad = await send_raw(app, text, attributes)
        return await receive_event(app, 2), bad

    event, bad = run(enqueue())
    if count is not None:
        next(r for r in event["Records"] if r["messageId"] == bad)["attributes"][
            "ApproximateReceiveCount"
        ] = count
    handler = aioworkers.lambda_handler(app)
    result = handler(event, Context(30_000))
    # Both records are settled: the good one ran, the bad one is in the DLQ, confirmed.
    assert result == {"batchItemFailures": []}
    assert ran == [1]
    (dead,) = run(app.dlq().list())
    assert dead.reason == reason
    assert dead.body == text.encode()  # as it came, so it can be inspected and replayed
    if body is None:
        assert (dead.task, dead.error_type) == ("ok", "DecodeError")
    # The same record again (SQS would not redeliver it now): dead-lettered again, no crash.
    assert handler(event, Context(30_000)) == {"batchItemFailures": []}
    assert ran == [1, 1]
    assert loop_errors() == []


def test_with_another_broker_a_malformed_record_is_reported_not_raised(
    loop_errors: Callable[[], list[dict[str, Any]]],
) -> None:
    # No sqs:// broker to write the dead letter: the record is reported for the queue's
    # redrive policy, and the rest of the batch still runs.
    app = aioworkers.App("memory://", queue="q")
    ran: list[int] = []

    @app.task
    async def ok(n: int) -> None:
        ran.append(n)

    def record(mid: str, body: str, attributes: dict[str, str]) -> dict[str, Any]:
        return {
            "messageId": mid,
            "body": body,
            "attributes": {"ApproximateReceiveCount": "1"},
            "messageAttributes": {
                k: {"stringValue": v, "dataType": "String"} for k, v in attributes.items()
            },
            "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:q",
        }

    event = {
        "Records": [
            record("bad-base", job("ok", 1), {"aw-base": "x"}),
            record("bad-b64", "%%%", {"aw-enc": "b64"}),
            record("good", job("ok", 3), {}),
        ]
    }
    result = aioworkers.lambda_handler(app)(event, None)
    failed = sorted(f["itemIdentifier"] for f in result["batchItemFailures"])
    assert failed == ["bad-b64", "bad-base"]
    assert ran == [3]
    assert loop_errors() == []


# -- item 4: one idempotency key, two invocations ---------------------------------------------


@pytest.fixture
async def store_url() -> AsyncIterator[str]:
    ensure(REDIS)
    prefix = f"test-lambda-{uuid.uuid4().hex[:12]}"
    try:
        yield f"{REDIS_URL}?prefix={prefix}"
    finally:
        await delete_prefix(prefix)


async def aclose_all(apps: list[aioworkers.App]) -> None:
    for app in apps:
        await app.aclose()


async def test_two_invocations_with_one_key_never_run_it_at_once(store_url: str) -> None:
    # Two function instances (two apps, one Redis store) get one job enqueued twice under
    # one key. The first runs longer than the claim's lease (the visibility timeout): the
    # heartbeat must keep the key, so the second defers instead of running it alongside.
    queue = f"lambda-{uuid.uuid4().hex[:12]}"
    apps = [
        aioworkers.App(
            sqs_url(moto_endpoint()), queue=queue, visibility_timeout=2, idempotency=store_url
        )
        for _ in range(2)
    ]
    first, second = apps
    active = peak = runs = 0
    started = asyncio.Event()

    async def charge() -> None:
        nonlocal active, peak, runs
        runs += 1
        active += 1
        peak = max(peak, active)
        started.set()
        try:
            await asyncio.sleep(4)
        finally:
            active -= 1

    for app in apps:
        app.task(idempotent=True)(charge)
    try:
        task: Any = first.tasks["charge"]
        await task.options(key="order-1").enqueue()
        await task.options(key="order-1").enqueue()
        a, b = ({"Records": [r]} for r in (await receive_event(first, 2))["Records"])
        one, two = aioworkers.lambda_handler(first), aioworkers.lambda_handler(second)
        running = asyncio.ensure_future(one.handle(a, Context(30_000)))
        await started.wait()
        # A real timer under test: past the first claim's 2 s lease, which only the
        # heartbeat can have kept.
        await asyncio.sleep(2.5)
        result = await two.handle(b, Context(30_000))
        assert result == {"batchItemFailures": []}  # deferred: sent again with a delay
        assert (runs, peak) == (1, 1)
        await delete_done(second, b, result)
        result = await running
        assert result == {"batchItemFailures": []}
        await delete_done(first, a, result)
        # The deferred copy, in a third invocation: the key is done, acked without a run.
        c = await receive_event(second, 1)
        result = await two.handle(c, Context(30_000))
        assert result == {"batchItemFailures": []}
        await delete_done(second, c, result)
        assert (runs, peak) == (1, 1)
        assert await first.stats() == aioworkers.QueueDepth()
    finally:
        await aclose_all(apps)


async def test_records_stay_hidden_until_the_invocation_returns() -> None:
    # As a worker extends its SQS leases, the adapter extends the visibility of its records
    # until the function returns (Lambda deletes the finished ones only then): SQS must not
    # hand either message to another invocation meanwhile, the one that finished early
    # included.
    app = aioworkers.App(
        sqs_url(moto_endpoint()), queue=f"lambda-{uuid.uuid4().hex[:12]}", visibility_timeout=2
    )
    finished = asyncio.Event()

    @app.task
    async def nap(seconds: float) -> None:
        await asyncio.sleep(seconds)

    try:
        # 3.5 s: longer than the queue's visibility timeout of 2 s. 1 s: past the first
        # heartbeat (2/3 s), which sets its visibility to 2 s from then, before 3.5 s.
        await app.enqueue_many([nap.call(3.5), nap.call(1)])
        event = await receive_event(app, 2, visibility=2)
        running = asyncio.ensure_future(aioworkers.lambda_handler(app).handle(event, None))
        running.add_done_callback(lambda _: finished.set())
        client = await app.broker.client()  # type: ignore[attr-defined]
        url = await queue_url(app)
        stolen = []
        while not finished.is_set():
            reply = await client.receive_message(QueueUrl=url, WaitTimeSeconds=0)
            stolen += reply.get("Messages", [])
            await asyncio.sleep(0.2)
        assert stolen == []
        assert await running == {"batchItemFailures": []}
    finally:
        await app.aclose()


async def test_a_run_whose_claim_is_lost_is_cancelled_and_reported(store_url: str) -> None:
    # Another instance took the key (the store lost this claim): the run must stop at the
    # next heartbeat and its record come back, not finish alongside the new owner.
    app = aioworkers.App(
        sqs_url(moto_endpoint()),
        queue=f"lambda-{uuid.uuid4().hex[:12]}",
        visibility_timeout=2,
        idempotency=store_url,
    )
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @app.task(idempotent=True)
    async def charge() -> None:
        started.set()
        try:
            await asyncio.sleep(8)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    try:
        await charge.options(key="order-1").enqueue()
        event = await receive_event(app, 1)
        running = asyncio.ensure_future(aioworkers.lambda_handler(app).handle(event, None))
        await started.wait()
        prefix = store_url.rsplit("prefix=", 1)[1]
        r = aioredis.from_url(REDIS_URL)
        try:
            assert await r.delete(f"{prefix}:charge:order-1") == 1
        finally:
            await r.aclose()
        assert await app.idempotency.claim("charge:order-1", "thief", lease=30) == "claimed"
        stolen_at = time.monotonic()
        result = await running
        assert cancelled.is_set()
        assert result == {
            "batchItemFailures": [{"itemIdentifier": event["Records"][0]["messageId"]}]
        }
        # Within a heartbeat or two (every 2/3 s), not when the handler would have ended.
        assert time.monotonic() - stolen_at < 5
    finally:
        await app.aclose()


async def test_a_run_whose_record_is_gone_is_cancelled_and_reported() -> None:
    # SQS refuses to extend the record (here: it was deleted; on AWS also when another
    # receive took it): like a worker that lost its lease, the run stops and settles nothing.
    app = aioworkers.App(
        sqs_url(moto_endpoint()), queue=f"lambda-{uuid.uuid4().hex[:12]}", visibility_timeout=2
    )
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @app.task
    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(8)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    try:
        await slow.enqueue()
        event = await receive_event(app, 1)
        (record,) = event["Records"]
        running = asyncio.ensure_future(aioworkers.lambda_handler(app).handle(event, None))
        await started.wait()
        client = await app.broker.client()  # type: ignore[attr-defined]
        await client.delete_message(
            QueueUrl=await queue_url(app), ReceiptHandle=record["receiptHandle"]
        )
        assert await running == {"batchItemFailures": [{"itemIdentifier": record["messageId"]}]}
        assert cancelled.is_set()
        assert await app.stats() == aioworkers.QueueDepth()  # nothing retried or dead-lettered
    finally:
        await app.aclose()


async def test_without_permission_to_extend_records_jobs_still_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A role with only the managed SQS execution policy may not change visibility: the
    # records then rely on the queue's visibility timeout, and the jobs run as before.
    from botocore.exceptions import ClientError

    app = aioworkers.App(
        sqs_url(moto_endpoint()), queue=f"lambda-{uuid.uuid4().hex[:12]}", visibility_timeout=1
    )
    ran: list[str] = []

    @app.task
    async def slow() -> None:
        await asyncio.sleep(1.5)  # past several heartbeats
        ran.append("slow")

    async def denied(**_: Any) -> None:
        error = {"Error": {"Code": "AccessDenied", "Message": "not allowed"}}
        raise ClientError(error, "ChangeMessageVisibilityBatch")

    try:
        await slow.enqueue()
        event = await receive_event(app, 1)
        client = await app.broker.client()  # type: ignore[attr-defined]
        monkeypatch.setattr(client, "change_message_visibility_batch", denied)
        assert await aioworkers.lambda_handler(app).handle(event, None) == {"batchItemFailures": []}
        assert ran == ["slow"]
        warnings = [r for r in caplog.records if "could not extend the visibility" in r.message]
        assert len(warnings) == 1
    finally:
        await app.aclose()
