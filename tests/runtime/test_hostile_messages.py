"""Messages built to hurt the worker: a huge task name must not freeze the event loop
(its leases, and the jobs beside it, survive), out-of-range numbers are schema errors on
the first delivery, and no field taken from a message can forge or flood a log line or a
dead-letter record."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from aioworkers import App, DeadLetter
from aioworkers._runtime.executor import Executor
from aioworkers._runtime.failure import dead_letter_for
from aioworkers._runtime.outcome import Dead, Outcome
from aioworkers.brokers.base import Delivery
from aioworkers.envelope import Envelope, encode, new_id, now_ms
from aioworkers.monitor import TEXT_FORMAT, JsonFormatter, RedactingFormatter

from ..services import REDIS, REDIS_URL, delete_prefix, ensure
from .conftest import POLL, VISIBILITY, MakeApp, run_burst, wait_until

KiB = 1024
MiB = 1024 * KiB


def body(task: str, *, job_id: str | None = None, **fields: Any) -> bytes:
    doc: dict[str, Any] = {
        "v": 1,
        "id": job_id or new_id(),
        "task": task,
        "args": [],
        "kwargs": {},
        "attempt": 1,
        "enqueued_at": now_ms(),
    }
    doc.update(fields)
    return orjson.dumps(doc)


class StallMeter:
    """The longest the event loop went without running a 10 ms ticker.

    A real timer under test: the fault was the loop frozen (by a regex) for longer than a
    lease, so the lease loop could not beat and other workers took the jobs over.
    """

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now

    async def __aenter__(self) -> StallMeter:
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def dead_count(app: App) -> int:
    return (await app.stats()).dead


async def until_dead(app: App, n: int, *, within: float) -> None:
    deadline = time.monotonic() + within
    while await dead_count(app) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"not {n} dead letters after {within}s")
        await asyncio.sleep(0.01)


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def real_app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[App]:
    """An App on a broker made from its URL, as a user makes one, taking messages of up to
    4 MiB (so a 1 MiB task name reaches the registry instead of the size check)."""
    prefix = f"aiowhostile-{uuid.uuid4().hex[:12]}"
    url = {
        "memory": "memory://",
        "sqlite": f"sqlite:///{tmp_path / 'jobs.db'}",
        "redis": f"{REDIS_URL}?prefix={prefix}",
    }[request.param]
    if request.param == "redis":
        ensure(REDIS)
    app = App(url, visibility_timeout=VISIBILITY, max_message_size=4 * MiB)
    try:
        async with app:
            yield app
    finally:
        if request.param == "redis":
            await delete_prefix(prefix)


# -- item 1: a huge task name -------------------------------------------------------------------


@pytest.mark.parametrize("size", [64 * KiB, MiB], ids=["64KiB", "1MiB"])
async def test_a_huge_task_name_is_dead_lettered_promptly_and_nothing_runs_twice(
    real_app: App, size: int
) -> None:
    app = real_app
    runs: Counter[int] = Counter()
    started = asyncio.Event()

    @app.task(retries=0)
    async def bystander(n: int) -> None:
        runs[n] += 1
        started.set()
        # In flight while the hostile message is handled: its lease must be kept across.
        await until_dead(app, 1, within=30)

    await bystander.enqueue(1)
    hostile_id = new_id()
    hostile = body("x" * size, job_id=hostile_id)
    async with StallMeter() as stall, app.worker(concurrency=4, poll=POLL) as worker:
        await asyncio.wait_for(started.wait(), 10)
        sent = time.monotonic()
        await app.broker.publish(app.queue, [hostile])
        await until_dead(app, 1, within=30)
        took = time.monotonic() - sent
    assert runs == {1: 1}
    assert worker.counts == {"ok": 1, "dead": 1}
    (letter,) = await app.dlq().list()
    assert (letter.id, letter.reason, letter.attempts) == (hostile_id, "unknown_task", 1)
    assert letter.body == hostile  # kept whole for inspection and replay
    assert_bounded(letter)
    # Generous bounds for a loaded machine; before the fix 64 KiB froze the loop for
    # 14-16 s (and 1 MiB for ~18 minutes), far past a lease of VISIBILITY seconds.
    assert stall.longest < VISIBILITY / 2, f"the event loop stalled {stall.longest:.2f}s"
    assert took < 10, f"dead-lettered after {took:.1f}s"


def assert_bounded(letter: DeadLetter) -> None:
    """Every field of ``letter`` taken from a message or an error is cut and escaped
    (a traceback keeps its line breaks)."""
    assert letter.id.isprintable()
    assert len(letter.id) < 300
    if letter.traceback is not None:
        assert len(letter.traceback) < 8300
        assert letter.traceback.replace("\n", "").isprintable()
    for value in (letter.task, letter.error):
        assert value is None or value.isprintable()
    assert letter.task is None or len(letter.task) < 300
    assert letter.error is None or len(letter.error) < 2100


# -- item 8: numbers out of range ---------------------------------------------------------------


async def test_out_of_range_numbers_are_dead_lettered_as_schema_errors_at_once(
    make_app: MakeApp,
) -> None:
    app, faulty = make_app(visibility_timeout=0.5, max_deliveries=3)
    ran: list[int] = []

    @app.task(retries=3)
    async def t() -> None:
        ran.append(1)

    bodies = [
        body("t", enqueued_at=10**15),
        body("t", enqueued_at=-1),
        body("t", eta=10**15),
        body("t", attempt=2**63),
        body("t", attempt=2**64 - 1, enqueued_at=2**64 - 1),
    ]
    await faulty.inner.publish("default", bodies)
    worker = app.worker(poll=POLL)
    await run_burst(worker, within=20)

    assert ran == []
    assert worker.counts == {"dead": len(bodies)}
    letters = await app.dlq().list()
    assert sorted(x.reason for x in letters) == ["schema_error"] * len(bodies)
    assert all(x.attempts == 1 for x in letters)
    # Dead-lettered on the first delivery: none was fetched twice.
    fetched = [d for call in faulty.calls_of("fetch", ok=True) for d in call.result]
    assert [d.count for d in fetched] == [1] * len(bodies)
    assert faulty.count("retry") == 0


# -- item 9: log forging and flooding -------------------------------------------------------------

FORGED = "2024-06-10 12:00:00,000 INFO aioworkers: job ok id=forged"


def formatted(caplog: pytest.LogCaptureFixture) -> list[tuple[logging.LogRecord, str, str]]:
    """Each aioworkers record with its text and JSON line, as ``aioworkers run`` writes them."""
    text, json = RedactingFormatter(TEXT_FORMAT), JsonFormatter()
    return [
        (r, text.format(r), json.format(r))
        for r in caplog.records
        if r.name.startswith("aioworkers") and not r.exc_info
    ]


async def test_a_newline_in_a_message_cannot_forge_a_log_line(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aioworkers")
    app, faulty = make_app()

    @app.task(retries=0)
    async def known(a: int = 0) -> None:
        pass

    bodies = [
        body(f"nope\n{FORGED}", job_id=f"id\r\n{FORGED}"),
        body("known", job_id=f"id2\n{FORGED}", kwargs={f"k\n{FORGED}": 1}),
        body(f"\x1b[2J\x1b[Hnope\u2028{FORGED}"),
    ]
    await faulty.inner.publish("default", bodies)
    worker = app.worker(poll=POLL)
    await run_burst(worker)
    assert worker.counts == {"dead": 3}

    lines = formatted(caplog)
    assert any("job failed" in text for _, text, _ in lines)
    for record, text, json in lines:
        # Called from an app's own logging setup too: the message itself is one line.
        assert record.getMessage().isprintable(), record.getMessage()
        assert text.isprintable()
        assert "\n" not in json
        doc = orjson.loads(json)
        for key in ("task", "job_id", "error"):
            assert doc.get(key) is None or doc[key].isprintable()
    for letter in await app.dlq().list():
        assert letter.id.isprintable()
        assert letter.task is None or letter.task.isprintable()
        assert letter.error is not None
        assert letter.error.isprintable()


async def test_huge_fields_give_bounded_log_lines_and_dlq_records(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aioworkers")
    app, faulty = make_app(max_message_size=8 * MiB, store="memory://")
    huge = "y" * (1000 * 1000)

    @app.task(retries=0)
    async def known(a: int = 0) -> None:
        raise ValueError(huge)

    @app.task(retries=0, idempotent=True)
    async def once() -> None:
        pass

    # The key is held by another worker, so the job is deferred (and says why, in a log).
    await app.idempotency.claim(f"once:{huge}", "elsewhere", lease=60)
    bodies = [
        body(huge),  # unknown_task
        body(huge, job_id=huge),  # unknown_task, and a huge id
        body("known", job_id=huge, kwargs={huge: 1}),  # bad_arguments
        body("known", args=[1]),  # the handler's own huge error
        body("no such", job_id=huge, attempt=0),  # schema_error
        body("once", job_id=huge, key=huge),  # deferred
    ]
    await faulty.inner.publish("default", bodies)
    async with app.worker(poll=POLL) as worker:
        await wait_until(lambda: sum(worker.counts.values()) >= len(bodies), what="all settled")
    # Deferred once at least (it may come back and be deferred again before the stop).
    assert (worker.counts["dead"], worker.counts["deferred"] >= 1) == (5, True)

    lines = formatted(caplog)
    assert sum("job failed" in text for _, text, _ in lines) == 5
    assert any("job deferred" in text for _, text, _ in lines)
    for record, text, json in lines:
        assert len(record.getMessage()) < 4 * KiB, record.getMessage()[:300]
        assert len(text) < 4 * KiB
        assert len(json) < 8 * KiB
    letters = await app.dlq().list()
    assert len(letters) == 5
    for letter in letters:
        assert_bounded(letter)


def test_the_facts_a_broker_stores_for_a_huge_unknown_task_are_bounded() -> None:
    raw = encode(Envelope(id="j" * MiB, task="t" * MiB, args=[], kwargs={}))
    delivery = Delivery("default", "1", raw)
    executor = Executor({}, max_message_size=4 * MiB, max_deliveries=5)
    env, task, error = executor.prepare(delivery)
    assert error is not None
    assert error.reason == "unknown_task"
    assert len(str(error)) < 300
    outcome = Outcome(env, task, Dead(error.reason), error)
    letter = dead_letter_for(delivery, outcome, error.reason, dead_at=0.0)
    assert len(orjson.dumps(letter.facts())) < 4 * KiB
