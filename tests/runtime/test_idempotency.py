"""Idempotent tasks on the memory broker: a done key is acked without running, a busy key
waits without using an attempt, a key never runs twice at once, a failure frees the key
for the retry, and an unreachable store runs nothing (fail closed)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence

import pytest

from aioworkers import App, ConfigError, QueueDepth, current_job
from aioworkers.envelope import decode
from aioworkers.idempotency import (
    ClaimResult,
    IdempotencyStore,
    MemoryStore,
    StoreUnavailable,
    default_url_for,
)
from aioworkers.testing import FakeClock

from .conftest import POLL, FaultyBroker, MakeApp, advance_until, run_burst, running, wait_until

# Short, so a deferred job (about visibility / 3) and a lapsed lease come back quickly.
VISIBILITY = 0.3


class FaultyStore:
    """Wraps a store: ``down`` makes every call raise `StoreUnavailable`; ``lose_claims``
    makes ``extend`` report every claim lost; ``calls`` counts the calls that got through."""

    def __init__(self, inner: IdempotencyStore) -> None:
        self.inner = inner
        self.down = False
        self.lose_claims = False
        self.calls: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()

    def _check(self, method: str) -> None:
        if self.down:
            self.failed[method] += 1
            raise StoreUnavailable(f"injected fault in {method}")
        self.calls[method] += 1

    async def claim(self, key: str, owner: str, *, lease: float) -> ClaimResult:
        self._check("claim")
        return await self.inner.claim(key, owner, lease=lease)

    async def extend(
        self, claims: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        self._check("extend")
        if self.lose_claims:
            return list(claims)
        return await self.inner.extend(claims, lease=lease)

    async def complete(self, key: str, owner: str, *, ttl: float) -> bool:
        self._check("complete")
        return await self.inner.complete(key, owner, ttl=ttl)

    async def release(self, key: str, owner: str) -> bool:
        self._check("release")
        return await self.inner.release(key, owner)

    async def aclose(self) -> None:
        await self.inner.aclose()


def faulty_app(
    make_app: MakeApp,
    visibility: float = VISIBILITY,
    clock: FakeClock | None = None,
    **kwargs: object,
) -> tuple[App, FaultyBroker, FaultyStore]:
    """With a ``clock``, the broker and the store run on it too."""
    store = FaultyStore(MemoryStore() if clock is None else MemoryStore(clock=clock.monotonic))
    app, faulty = make_app(visibility_timeout=visibility, idempotency=store, clock=clock, **kwargs)
    return app, faulty, store


def total(workers: Sequence[object], outcome: str) -> int:
    return sum(w.counts.get(outcome, 0) for w in workers)  # type: ignore[attr-defined]


# -- duplicates ----------------------------------------------------------------------------


async def test_the_same_key_enqueued_twice_runs_once(make_app: MakeApp) -> None:
    app, faulty, store = faulty_app(make_app)
    runs: list[str] = []

    @app.task(idempotent=True)
    async def charge(order: str) -> None:
        runs.append(order)

    await charge.options(key="order-1").enqueue("first")
    await charge.options(key="order-1").enqueue("second")
    await charge.options(key="order-2").enqueue("other key")
    worker = app.worker(concurrency=1, poll=POLL)
    await run_burst(worker)

    assert runs == ["first", "other key"]
    assert worker.counts == {"ok": 2, "duplicate": 1}
    assert len(faulty.settled("ack")) == 3  # the duplicate is acked, not dead-lettered
    assert await app.stats() == QueueDepth()
    assert store.calls["complete"] == 2


async def test_keys_are_scoped_by_task(make_app: MakeApp) -> None:
    app, _, _ = faulty_app(make_app)
    runs: list[str] = []

    @app.task(idempotent=True)
    async def email() -> None:
        runs.append("email")

    @app.task(idempotent=True)
    async def sms() -> None:
        runs.append("sms")

    await email.options(key="welcome:42").enqueue()
    await sms.options(key="welcome:42").enqueue()
    worker = app.worker(concurrency=1, poll=POLL)
    await run_burst(worker)

    assert runs == ["email", "sms"]
    assert worker.counts == {"ok": 2}


async def test_tasks_not_marked_idempotent_ignore_keys(make_app: MakeApp) -> None:
    app, _, store = faulty_app(make_app)
    runs: list[int] = []

    @app.task
    async def plain() -> None:
        runs.append(1)

    await plain.options(key="k").enqueue()
    await plain.options(key="k").enqueue()
    await run_burst(app.worker(concurrency=1, poll=POLL))

    assert runs == [1, 1]
    assert sum(store.calls.values()) == 0


async def test_a_job_redelivered_after_it_completed_is_not_run_again(make_app: MakeApp) -> None:
    """The handler ran and its key was committed, but the ack never reached the broker: the
    lease ran out and the job came back. Without a key: the job id is the key."""
    app, faulty, _ = faulty_app(make_app)
    runs: list[int] = []

    @app.task(idempotent=True)
    async def ship() -> None:
        runs.append(current_job().delivery_count)

    await ship.enqueue()
    faulty.fail_while("ack")
    faulty.fail_while("extend")  # the worker is cut off: its lease runs out
    async with app.worker(concurrency=2, poll=POLL, grace=1) as worker:
        await wait_until(
            lambda: sum(len(c.result or ()) for c in faulty.calls_of("fetch", ok=True)) == 2,
            within=3,
            what="the redelivery",
        )
        (second,) = faulty.calls_of("fetch", ok=True)[-1].result
        assert second.count == 2
        faulty.heal("ack")
        faulty.heal("extend")
        await wait_until(lambda: worker.counts.get("duplicate") == 1, what="the duplicate ack")
        await wait_until(lambda: worker.in_flight == 0, what="both settled")

    assert runs == [1]
    assert second in faulty.settled("ack")
    assert await app.stats() == QueueDepth()


async def test_a_done_key_is_remembered_for_the_ttl(make_app: MakeApp) -> None:
    clock = FakeClock()
    app, _ = make_app(idempotency=MemoryStore(clock=clock.monotonic), idempotency_ttl=60)
    runs: list[int] = []

    @app.task(idempotent=True)
    async def report() -> None:
        runs.append(1)

    await report.options(key="daily").enqueue()
    await run_burst(app.worker(poll=POLL))
    await clock.advance(59)
    await report.options(key="daily").enqueue()
    await run_burst(app.worker(poll=POLL))
    assert runs == [1]
    await clock.advance(1)
    await report.options(key="daily").enqueue()
    await run_burst(app.worker(poll=POLL))
    assert runs == [1, 1]


# -- never twice at once ---------------------------------------------------------------------


async def test_a_busy_key_is_deferred_without_using_an_attempt(
    make_app: MakeApp, clock: FakeClock
) -> None:
    app, faulty, _ = faulty_app(make_app, clock=clock)
    gate = asyncio.Event()
    runs: list[tuple[str, int]] = []

    # retries=0: had a deferral counted as an attempt, the second job would be dead.
    @app.task(idempotent=True, retries=0)
    async def pay(who: str) -> None:
        runs.append((who, current_job().attempt))
        if who == "first":
            await gate.wait()
            raise RuntimeError("card declined")

    await pay.options(key="invoice-7").enqueue("first")
    async with running(app.worker(poll=POLL, clock=clock), clock) as worker:
        await wait_until(lambda: len(runs) == 1, what="the first job to start")
        await pay.options(key="invoice-7").enqueue("second")
        await advance_until(clock, lambda: worker.counts.get("deferred", 0) >= 3, step=0.01)
        assert runs == [("first", 1)]
        gate.set()  # the first fails: its key is released and the second may claim it
        await advance_until(clock, lambda: worker.counts.get("ok") == 1, what="the 2nd job")

    assert runs == [("first", 1), ("second", 1)]
    assert worker.counts["dead"] == 1
    for call in faulty.calls_of("retry", ok=True):
        # Deferred as is: same body, same attempt.
        assert decode(call.kwargs["body"]).attempt == 1
        assert call.kwargs["body"] == call.args[0].body
        assert 0 < call.kwargs["delay"] <= VISIBILITY / 3
    assert await app.stats() == QueueDepth(dead=1)


async def test_two_workers_racing_on_one_key_never_run_it_at_once(make_app: MakeApp) -> None:
    app, _, _ = faulty_app(make_app)
    active = 0
    most = 0
    attempts = 0

    @app.task(idempotent=True, retries=5, backoff=0)
    async def settle_invoice() -> None:
        nonlocal active, most, attempts
        active += 1
        most = max(most, active)
        attempts += 1
        try:
            await asyncio.sleep(0.03)
            if attempts <= 2:
                raise RuntimeError("flaky")  # frees the key: another delivery takes it
        finally:
            active -= 1

    await app.enqueue_many([settle_invoice.options(key="inv-1").call() for _ in range(6)])
    workers = [app.worker(concurrency=3, poll=POLL) for _ in range(2)]
    async with asyncio.timeout(8):
        await asyncio.gather(*(w.run(burst=True) for w in workers))

    assert most == 1
    assert attempts == 3  # two failures, then one success; every other job a duplicate
    assert total(workers, "ok") == 1
    assert total(workers, "duplicate") == 5
    assert total(workers, "retried") == 2
    assert total(workers, "dead") == 0
    assert total(workers, "deferred") >= 1  # they did race
    assert await app.stats() == QueueDepth()


async def test_a_long_job_keeps_its_key_claimed(make_app: MakeApp, clock: FakeClock) -> None:
    app, _, store = faulty_app(make_app, clock=clock)
    runs: list[int] = []

    @app.task(idempotent=True)
    async def export() -> None:
        runs.append(1)
        await clock.sleep(VISIBILITY * 2)

    await export.options(key="export-1").enqueue()
    async with running(app.worker(poll=POLL, clock=clock), clock) as worker:
        await wait_until(lambda: runs == [1], what="the job to start")
        # Without heartbeats on the key its claim would lapse after one visibility timeout
        # and this copy would claim it and run alongside.
        await export.options(key="export-1").enqueue()
        await advance_until(
            clock, lambda: worker.counts.get("duplicate") == 1, step=0.01, what="the dup"
        )

    assert runs == [1]
    assert store.calls["extend"] >= 2
    assert worker.counts["ok"] == 1


async def test_a_lost_claim_cancels_the_run_and_commits_nothing(
    make_app: MakeApp, clock: FakeClock
) -> None:
    visibility = 1.0
    app, _, store = faulty_app(make_app, visibility, clock=clock)
    runs: list[int] = []
    cancelled: list[int] = []

    @app.task(idempotent=True)
    async def long() -> None:
        runs.append(current_job().delivery_count)
        if len(runs) > 1:
            return
        try:
            await clock.sleep(visibility * 3)
        except asyncio.CancelledError:
            cancelled.append(1)
            store.lose_claims = False  # the store recovers before the next delivery
            raise

    await long.enqueue()
    store.lose_claims = True
    async with running(app.worker(poll=POLL, clock=clock), clock) as worker:
        # The first beat on the claim learns it is lost.
        took = await advance_until(clock, lambda: cancelled == [1], what="the cancel")
        assert took <= visibility / 3 + POLL
        # The redelivery waits for the broker lease to run out.
        took = await advance_until(clock, lambda: worker.counts.get("ok") == 1)
        assert took <= visibility + POLL

    assert runs == [1, 2]  # the key was not completed by the cancelled run
    assert worker.counts["lease_lost"] == 1
    assert store.calls["complete"] == 1


async def test_a_handler_that_finished_after_its_lease_was_lost_completes_its_key(
    make_app: MakeApp,
) -> None:
    """The handler returns normally after its lease was lost (it swallowed the
    cancellation): its effects happened and the claim is still its own, so the key is
    completed and the redelivery is acked as a duplicate instead of running again."""
    app, faulty, store = faulty_app(make_app)
    runs: list[int] = []

    @app.task(idempotent=True)
    async def stubborn() -> None:
        runs.append(current_job().delivery_count)
        if len(runs) == 1:
            try:
                await asyncio.sleep(VISIBILITY * 3)
            except asyncio.CancelledError:
                faulty.lose_leases = False
                return  # swallowed: the handler "succeeds" after losing its lease

    await stubborn.enqueue()
    faulty.lose_leases = True
    async with app.worker(poll=POLL) as worker:
        await wait_until(
            lambda: worker.counts.get("duplicate") == 1, within=6, what="the redelivery"
        )

    assert runs == [1]
    assert worker.counts["lease_lost"] == 1
    assert worker.counts["duplicate"] == 1
    assert store.calls["complete"] == 1
    assert len(faulty.settled("ack")) == 1


# -- failures and store outages --------------------------------------------------------------


async def test_a_failing_job_retries_then_runs_once(make_app: MakeApp) -> None:
    app, _, store = faulty_app(make_app)
    attempts: list[int] = []

    @app.task(idempotent=True, retries=3, backoff=0.01)
    async def flaky() -> None:
        attempts.append(current_job().attempt)
        if len(attempts) < 3:
            raise ConnectionError("try again")

    await flaky.options(key="k").enqueue()
    worker = app.worker(concurrency=1, poll=POLL)
    await run_burst(worker)
    await flaky.options(key="k").enqueue()
    again = app.worker(concurrency=1, poll=POLL)
    await run_burst(again)

    assert attempts == [1, 2, 3]
    assert worker.counts == {"retried": 2, "ok": 1}
    assert again.counts == {"duplicate": 1}
    assert store.calls["release"] == 2
    assert store.calls["complete"] == 1


async def test_a_dead_lettered_job_frees_its_key_for_a_replay(make_app: MakeApp) -> None:
    app, _, _ = faulty_app(make_app)
    runs: list[int] = []

    @app.task(idempotent=True, retries=0)
    async def once() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("first time fails")

    await once.options(key="k").enqueue()
    await run_burst(app.worker(poll=POLL))
    assert await app.dlq().replay() == 1
    worker = app.worker(poll=POLL)
    await run_burst(worker)

    assert runs == [1, 1]
    assert worker.counts == {"ok": 1}


async def test_an_unreachable_store_runs_nothing_until_it_is_back(make_app: MakeApp) -> None:
    app, _, store = faulty_app(make_app)
    runs: list[int] = []

    # retries=0: had an outage counted as a failed attempt, the job would be dead.
    @app.task(idempotent=True, retries=0)
    async def charge() -> None:
        runs.append(current_job().attempt)

    store.down = True
    await charge.options(key="order-9").enqueue()
    async with app.worker(poll=POLL) as worker:
        await wait_until(lambda: worker.counts.get("deferred", 0) >= 3, what="deferrals")
        assert runs == []  # fail closed: no store, no run
        assert await app.stats() in (QueueDepth(delayed=1), QueueDepth(in_flight=1))
        store.down = False
        await wait_until(lambda: worker.counts.get("ok") == 1, what="the run")

    assert runs == [1]
    assert "dead" not in worker.counts
    assert await app.stats() == QueueDepth()


async def test_a_store_outage_at_completion_holds_the_ack_until_it_commits(
    make_app: MakeApp, clock: FakeClock
) -> None:
    app, faulty, store = faulty_app(make_app, clock=clock)
    runs: list[int] = []

    @app.task(idempotent=True)
    async def charge() -> None:
        runs.append(1)
        store.down = True  # the store goes away while the handler runs

    await charge.enqueue()
    async with running(app.worker(poll=POLL, clock=clock), clock) as worker:
        await wait_until(lambda: runs == [1], what="the run")
        # Two tries fail (pauses of at most 0.05 s and 0.1 s, well within the claim's 0.3 s).
        await advance_until(clock, lambda: store.failed["complete"] >= 2, step=0.01)
        assert faulty.settled("ack") == []  # no ack before the key is committed
        store.down = False
        await advance_until(clock, lambda: worker.counts.get("ok") == 1, step=0.01)

    assert runs == [1]
    assert store.calls["complete"] == 1
    assert await app.stats() == QueueDepth()


async def test_a_store_outage_past_the_lease_defers_the_job(
    make_app: MakeApp, clock: FakeClock
) -> None:
    """The key could not be committed while the claim lasted: the job is not acked (that
    would break at-least-once) but deferred; its next delivery finds the key free once the
    old claim lapses, and runs it again."""
    app, faulty, store = faulty_app(make_app, clock=clock)
    runs: list[int] = []

    @app.task(idempotent=True, retries=0)
    async def charge() -> None:
        runs.append(current_job().attempt)
        if len(runs) == 1:
            store.down = True

    await charge.enqueue()
    async with running(app.worker(poll=POLL, clock=clock), clock) as worker:
        took = await advance_until(clock, lambda: worker.counts.get("deferred") == 1, step=0.01)
        assert took <= VISIBILITY  # given up within the claim's lease
        assert faulty.settled("ack") == []
        store.down = False
        await advance_until(clock, lambda: worker.counts.get("ok") == 1, what="the rerun")

    assert runs == [1, 1]


# -- configuration ---------------------------------------------------------------------------


async def test_the_default_store_is_one_memory_store_per_app() -> None:
    app = App("memory://")
    other = App("memory://")
    assert isinstance(app.idempotency, MemoryStore)
    assert app.idempotency is app.idempotency
    assert app.idempotency is not other.idempotency
    assert isinstance(App(idempotency="memory://").idempotency, MemoryStore)
    store = MemoryStore()
    assert App(idempotency=store).idempotency is store


async def test_two_workers_of_one_app_share_its_store(make_app: MakeApp) -> None:
    app, _ = make_app(store="memory://")  # a wrapped broker implies no store
    runs: list[int] = []

    @app.task(idempotent=True)
    async def once() -> None:
        runs.append(1)

    await once.options(key="k").enqueue()
    await run_burst(app.worker(poll=POLL))
    await once.options(key="k").enqueue()
    await run_burst(app.worker(poll=POLL))
    assert runs == [1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"idempotency": "mongodb://u:secret@h"}, "scheme must be one of"),
        ({"idempotency_ttl": 0}, "idempotency_ttl must be > 0"),
        ({"idempotency_ttl": -5}, "idempotency_ttl must be > 0"),
    ],
)
def test_bad_idempotency_config_is_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        App("memory://", **kwargs)  # type: ignore[arg-type]
    assert "secret" not in str(info.value)


def test_a_redis_store_url_does_not_import_redis_until_used() -> None:
    code = (
        "import sys, aioworkers\n"
        "app = aioworkers.App('memory://', idempotency='redis://127.0.0.1:6379/0')\n"
        "assert 'redis' not in sys.modules, 'imported at App()'\n"
        "store = app.idempotency\n"
        "assert type(store).__name__ == 'RedisStore', store\n"
        "assert 'redis' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


async def test_a_redis_broker_shares_its_server_for_idempotency_keys() -> None:
    app = App("redis://127.0.0.1:6379/3?prefix=shop&group=billing")  # nothing connects

    @app.task(idempotent=True)
    async def once() -> None: ...

    store = app.idempotency
    try:
        assert type(store).__name__ == "RedisStore"
        # Every worker of the app sees every key: same server and db, the app's prefix.
        assert store.prefix == "shop:idempotency"  # type: ignore[attr-defined]
        assert default_url_for("memory://") == ""
    finally:
        await app.aclose()
