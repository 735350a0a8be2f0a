"""Messages that can never run go to the DLQ with their reason, without retries, while the
jobs around them run; a message delivered too often is dead-lettered before dispatch."""

from __future__ import annotations

import orjson
import pytest

from aioworkers import App, DeadLetter, QueueDepth, current_job
from aioworkers.envelope import Envelope, encode, new_id, now_ms
from aioworkers.testing import FakeClock

from .conftest import POLL, FaultyBroker, MakeApp, run_burst


def envelope(task: str, *args: object, **kwargs: object) -> bytes:
    return encode(
        Envelope(id=new_id(), task=task, args=list(args), kwargs=kwargs, enqueued_at=now_ms())
    )


async def test_malformed_messages_are_dead_lettered_while_good_jobs_run(
    app_and_broker: tuple[App, FaultyBroker],
) -> None:
    app, faulty = app_and_broker
    done: list[int] = []

    @app.task(retries=5)
    async def good(n: int) -> None:
        done.append(n)

    unknown = Envelope(id=new_id(), task="no_such_task", args=[], kwargs={}, enqueued_at=now_ms())
    bad_args = Envelope(id=new_id(), task="good", args=[1, 2], kwargs={}, enqueued_at=now_ms())
    bodies = [
        envelope("good", 0),
        b"\x00\xffnot json at all{",
        envelope("good", 1),
        encode(unknown),
        envelope("good", 2),
        encode(bad_args),
        envelope("good", 3),
        orjson.dumps({"v": 1, "id": "x"}),
        envelope("good", n=4),
    ]
    await faulty.inner.publish("default", bodies)
    worker = app.worker(concurrency=3, poll=POLL)
    await run_burst(worker)

    assert sorted(done) == [0, 1, 2, 3, 4]
    # Final: no message is retried.
    assert faulty.count("retry") == 0
    assert worker.counts == {"ok": 5, "dead": 4}
    assert await app.stats() == QueueDepth(dead=4)

    letters = {letter.reason: letter for letter in await app.dlq().list()}
    assert sorted(letters) == ["bad_arguments", "decode_error", "schema_error", "unknown_task"]
    assert all(letter.attempts == 1 for letter in letters.values())
    assert all(letter.error_type == "DecodeError" for letter in letters.values())

    garbage = letters["decode_error"]
    assert garbage.task is None
    assert garbage.body == b"\x00\xffnot json at all{"
    assert garbage.id  # the broker's message id stands in for the unreadable job id

    assert (letters["unknown_task"].id, letters["unknown_task"].task) == (
        unknown.id,
        "no_such_task",
    )
    assert (letters["bad_arguments"].id, letters["bad_arguments"].task) == (bad_args.id, "good")
    assert letters["bad_arguments"].error is not None
    assert "argument" in letters["bad_arguments"].error


async def test_unknown_task_enqueued_by_name(app: App) -> None:
    job_id = await app.enqueue("not_registered_here", args=[1])
    await run_burst(app.worker(poll=POLL))

    (letter,) = await app.dlq().list()
    assert (letter.id, letter.task, letter.reason) == (
        job_id,
        "not_registered_here",
        "unknown_task",
    )


async def test_oversized_message_is_dead_lettered(make_app: MakeApp) -> None:
    app, faulty = make_app(max_message_size=200)

    @app.task
    async def big(blob: str) -> None:
        raise AssertionError("must not run")

    await faulty.inner.publish("default", [envelope("big", "x" * 500)])
    await run_burst(app.worker(poll=POLL))

    (letter,) = await app.dlq().list()
    assert letter.reason == "payload_too_large"


async def _deliver_and_abandon(broker: FaultyBroker, clock: FakeClock, times: int) -> None:
    """Fetch the only message ``times`` times without settling it, as workers that crashed
    mid-job would, letting its lease expire each time."""
    for n in range(1, times + 1):
        (delivery,) = await broker.inner.fetch("default", max_messages=10, wait=0)
        assert delivery.count == n
        await clock.advance(10)


@pytest.mark.parametrize("max_deliveries", [1, 3])
async def test_poison_message_is_dead_lettered_without_running(
    make_app: MakeApp, clock: FakeClock, max_deliveries: int
) -> None:
    app, faulty = make_app(visibility_timeout=5.0, clock=clock, max_deliveries=max_deliveries)
    ran: list[str] = []

    @app.task(retries=10)
    async def crasher() -> None:
        ran.append(current_job().id)

    job_id = await crasher.enqueue()
    await _deliver_and_abandon(faulty, clock, max_deliveries)

    worker = app.worker(poll=POLL, clock=clock)
    await run_burst(worker, clock=clock)

    assert ran == []
    assert worker.counts == {"dead": 1}
    (letter,) = await app.dlq().list()
    assert isinstance(letter, DeadLetter)
    assert (letter.id, letter.task, letter.reason) == (job_id, "crasher", "max_deliveries")
    assert letter.error is not None
    assert str(max_deliveries + 1) in letter.error
    assert await app.stats() == QueueDepth(dead=1)


async def test_message_at_the_delivery_limit_still_runs(
    make_app: MakeApp, clock: FakeClock
) -> None:
    app, faulty = make_app(visibility_timeout=5.0, clock=clock, max_deliveries=3)
    counts: list[int] = []

    @app.task
    async def survivor() -> None:
        counts.append(current_job().delivery_count)

    await survivor.enqueue()
    await _deliver_and_abandon(faulty, clock, 2)
    await run_burst(app.worker(poll=POLL, clock=clock), clock=clock)

    assert counts == [3]
    assert await app.stats() == QueueDepth()


async def test_poison_message_with_real_lease_expiry(make_app: MakeApp) -> None:
    app, faulty = make_app(visibility_timeout=0.1, max_deliveries=1)
    ran: list[int] = []

    @app.task
    async def crasher() -> None:
        ran.append(1)

    await crasher.enqueue()
    (first,) = await faulty.inner.fetch("default", max_messages=1, wait=0)
    assert first.count == 1
    # Not settled: the lease runs out and the worker gets the second delivery.
    await run_burst(app.worker(poll=POLL))

    assert ran == []
    (letter,) = await app.dlq().list()
    assert letter.reason == "max_deliveries"
