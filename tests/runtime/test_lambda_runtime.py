"""The Lambda adapter runs records through the worker's own job runtime: the same policy,
the same task timeouts (``job_timeout`` included), the same structured log fields. Here on
a memory broker (no SQS: retries and dead letters are reported for SQS to redeliver and
dead-letter by its redrive policy); tests/e2e_sqs has the adapter on SQS."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import aioworkers
from aioworkers.envelope import Envelope, encode

ARN = "arn:aws:sqs:us-east-1:123456789012:default"


def record(task: str, *args: Any, job_id: str = "job-1", received: int = 1) -> dict[str, Any]:
    body = encode(Envelope(id=job_id, task=task, args=list(args), kwargs={}))
    return {
        "messageId": f"m-{job_id}",
        "receiptHandle": f"r-{job_id}",
        "body": body.decode(),
        "attributes": {"ApproximateReceiveCount": str(received)},
        "messageAttributes": {},
        "eventSourceARN": ARN,
    }


def failures(result: dict[str, Any]) -> list[str]:
    return [f["itemIdentifier"] for f in result["batchItemFailures"]]


async def test_a_record_runs_and_is_reported_done() -> None:
    app = aioworkers.App("memory://")
    ran: list[tuple[str, int]] = []

    @app.task
    async def greet(name: str) -> None:
        job = aioworkers.current_job()
        ran.append((name, job.delivery_count))

    result = await aioworkers.lambda_handler(app).handle({"Records": [record("greet", "a")]})
    assert failures(result) == []
    assert ran == [("a", 1)]


async def test_job_timeout_bounds_a_task_without_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = aioworkers.App("memory://")
    finished: list[int] = []

    @app.task(retries=0)
    async def slow() -> None:
        await asyncio.sleep(5)
        finished.append(1)

    handler = aioworkers.lambda_handler(app, job_timeout=0.1)
    with caplog.at_level(logging.ERROR, logger="aioworkers"):
        result = await asyncio.wait_for(handler.handle({"Records": [record("slow")]}), 3)
    assert finished == []
    # No DLQ writer on memory://: reported, for the queue's redrive policy.
    assert failures(result) == ["m-job-1"]
    (failed,) = [r for r in caplog.records if r.getMessage().startswith("job failed")]
    assert "timed out after 0.1s" in failed.getMessage()


async def test_its_failure_logs_carry_the_workers_fields(caplog: pytest.LogCaptureFixture) -> None:
    app = aioworkers.App("memory://")

    @app.task(retries=3)
    async def flaky() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.WARNING, logger="aioworkers"):
        result = await aioworkers.lambda_handler(app).handle({"Records": [record("flaky")]})
    assert failures(result) == ["m-job-1"]  # no SQS to publish the retry: redelivered
    (failed,) = [r for r in caplog.records if r.getMessage().startswith("job failed")]
    job = failed.__dict__["job"]
    assert job["job_id"] == "job-1"
    assert job["task"] == "flaky"
    assert job["attempt"] == 1
    assert job["queue"] == "default"
    assert job["error_type"] == "RuntimeError"
    assert job["outcome"] == "retried"
    assert job["duration"] >= 0


async def test_a_poison_record_is_dead_lettered_by_the_same_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = aioworkers.App("memory://", max_deliveries=3)
    ran: list[int] = []

    @app.task
    async def crashy() -> None:
        ran.append(1)

    with caplog.at_level(logging.ERROR, logger="aioworkers"):
        result = await aioworkers.lambda_handler(app).handle(
            {"Records": [record("crashy", received=4)]}
        )
    assert ran == []
    assert failures(result) == ["m-job-1"]
    (failed,) = [r for r in caplog.records if r.getMessage().startswith("job failed")]
    assert failed.__dict__["job"]["detail"] == "dead-lettered (max_deliveries)"
    assert failed.__dict__["job"]["error"] == "delivered 4 times"
