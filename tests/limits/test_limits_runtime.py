"""Concurrency and rate limits on the memory broker and store, on a `FakeClock` shared by
the worker, the broker and the store: never over a limit, throttled jobs keep their
attempt, `RateLimited` pauses every worker, a dead holder's slot frees within a lease, a
slot is kept by the heartbeat and a lost one stops its run, and a task without limits
makes no store call for them."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import pytest

import aioworkers
from aioworkers import App, ConfigError, RateLimited, current_job
from aioworkers._runtime.limits import FIRST_GUESS, Limiter, Limits
from aioworkers._runtime.outcome import OutcomeName
from aioworkers.brokers.memory import MemoryBroker
from aioworkers.testing import FakeClock

from ..runtime.conftest import advance_until, running
from .conftest import VISIBILITY, CountingStore


class Ledger:
    """What ran: running and peak counts per key, start times, attempts."""

    def __init__(self) -> None:
        self.running: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.starts: list[tuple[float, str]] = []
        self.attempts: list[int] = []
        self.done = 0

    def start(self, key: str, at: float) -> None:
        self.running[key] += 1
        self.peak[key] = max(self.peak[key], self.running[key])
        self.starts.append((at, key))
        self.attempts.append(current_job().attempt)

    def end(self, key: str) -> None:
        self.running[key] -= 1
        self.done += 1


async def test_concurrency_per_key_is_never_exceeded(
    app: App, clock: FakeClock, store: CountingStore
) -> None:
    ledger = Ledger()

    @app.task(concurrency=2, limit_key="tenant")
    async def export(tenant: str, month: int) -> None:
        ledger.start(tenant, clock.time())
        await clock.sleep(1.0)
        ledger.end(tenant)

    tenants = ["a", "b", "c"]
    for month in range(8):
        for tenant in tenants:
            await export.enqueue(tenant, month)
    worker = app.worker(concurrency=50, poll=0.05, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: ledger.done == 24, within=120, what="all jobs")
    assert ledger.peak == dict.fromkeys(tenants, 2)  # each key reached its limit, never more
    assert worker.counts[OutcomeName.THROTTLED] > 0
    assert worker.counts[OutcomeName.OK] == 24
    assert set(ledger.attempts) == {1}  # a throttled job consumed no attempt
    # Every start took one store call for its slot; every slot was given back.
    assert store.calls["release_lease"] >= 24


async def test_a_throttled_key_does_not_hold_back_other_keys(app: App, clock: FakeClock) -> None:
    ledger = Ledger()

    @app.task(concurrency=1, limit_key="tenant")
    async def export(tenant: str, n: int) -> None:
        ledger.start(tenant, clock.time())
        await clock.sleep(100.0 if tenant == "slow" else 0.1)
        ledger.end(tenant)

    for n in range(5):
        await export.enqueue("slow", n)
    for n in range(5):
        await export.enqueue("fast", n)
    worker = app.worker(concurrency=10, poll=0.05, clock=clock)
    async with running(worker, clock):
        took = await advance_until(
            clock, lambda: ledger.running["fast"] == 0 and ledger.done >= 5, what="fast jobs"
        )
        # The fast key's five ran while the slow key held its only slot all along.
        assert ledger.peak["slow"] == 1
        assert took < 100
        worker.stop()
        await advance_until(clock, lambda: worker.state == "STOPPED", within=200)


async def test_a_rate_limit_spaces_starts_evenly(app: App, clock: FakeClock) -> None:
    ledger = Ledger()

    @app.task(rate_limit="5/s")
    async def call_partner(order_id: int) -> None:
        ledger.start("partner", clock.time())
        ledger.end("partner")

    for order_id in range(20):
        await call_partner.enqueue(order_id)
    worker = app.worker(concurrency=20, poll=0.05, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: ledger.done == 20, step=0.01, within=60)
    times = sorted(at for at, _ in ledger.starts)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.2 - 1e-6  # one start every per / N seconds
    for start in times:  # so any window of one second holds at most 5
        assert sum(start <= t < start + 1.0 for t in times) <= 5
    assert set(ledger.attempts) == {1}
    assert worker.counts[OutcomeName.THROTTLED] > 0


async def test_a_rate_limited_backlog_takes_turns_and_uses_every_token(
    app: App, clock: FakeClock, store: CountingStore
) -> None:
    # 60 jobs at 10/s on 20 slots: the waiters must not all come back at each token (one
    # would start and the rest be throttled again, a store call and a broker trip each),
    # and no token may go unused while jobs wait (the backlog takes 59 spacings, no more).
    ledger = Ledger()

    @app.task(rate_limit="10/s")
    async def call_partner(order_id: int) -> None:
        ledger.start("partner", clock.time())
        ledger.end("partner")

    for order_id in range(60):
        await call_partner.enqueue(order_id)
    worker = app.worker(concurrency=20, poll=0.05, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: ledger.done == 60, step=0.005, within=60)
    times = sorted(at for at, _ in ledger.starts)
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.1 - 1e-6
    assert times[-1] - times[0] <= 59 * 0.1 * 1.1
    assert worker.counts[OutcomeName.THROTTLED] <= 2 * 60
    # a start, and per throttle: the take that throttled it and one or two at its turn
    assert store.calls["take"] <= 4 * 60


async def test_rate_limited_comes_back_after_retry_after_without_an_attempt(
    app: App, clock: FakeClock
) -> None:
    starts: list[tuple[float, int]] = []

    @app.task(retries=0)
    async def flaky(n: int) -> None:
        starts.append((clock.time(), current_job().attempt))
        if len(starts) == 1:
            raise RateLimited(retry_after=30)

    await flaky.enqueue(1)
    worker = app.worker(concurrency=5, poll=0.05, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: len(starts) == 2, step=0.5, within=60)
    (first, attempt1), (second, attempt2) = starts
    assert second - first >= 30
    assert attempt1 == attempt2 == 1  # retries=0, and still not dead-lettered
    assert worker.counts[OutcomeName.THROTTLED] == 1
    assert worker.counts[OutcomeName.OK] == 1


async def test_rate_limited_pauses_the_key_for_every_worker(app: App, clock: FakeClock) -> None:
    starts: list[tuple[float, str, int]] = []

    @app.task(rate_limit="10/s", limit_key="partner")
    async def call(partner: str, n: int) -> None:
        starts.append((clock.time(), partner, n))
        if (partner, n) == ("p", 0) and len(starts) == 1:
            raise RateLimited(retry_after=20)

    await call.enqueue("p", 0)
    one = app.worker(concurrency=5, poll=0.05, clock=clock)
    two = app.worker(concurrency=5, poll=0.05, clock=clock)
    async with running(one, clock), running(two, clock):
        await advance_until(clock, lambda: len(starts) == 1, step=0.05)
        paused_at = starts[0][0]
        for n in range(1, 11):
            await call.enqueue("p", n)
        await call.enqueue("q", 1)  # another key of the task is not paused
        await advance_until(clock, lambda: len(starts) == 13, step=0.1, within=120)
    during = [(p, n) for at, p, n in starts[1:] if at < paused_at + 20]
    assert during == [("q", 1)]
    # Both workers held jobs back: the pause is in the store, not in one process.
    assert one.counts[OutcomeName.THROTTLED] > 1
    assert two.counts[OutcomeName.THROTTLED] > 1


async def test_a_dead_holders_slot_frees_within_one_lease(
    app: App, clock: FakeClock, store: CountingStore
) -> None:
    starts: list[float] = []

    @app.task(concurrency=1)
    async def export(n: int) -> None:
        starts.append(clock.time())

    # A worker that took the only slot and was killed: its lease is never extended.
    assert await store.acquire_lease("export", "killed-worker", limit=1, lease=VISIBILITY)
    t0 = clock.time()
    await export.enqueue(1)
    worker = app.worker(concurrency=5, poll=0.05, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: bool(starts), step=0.05, within=60)
    assert VISIBILITY <= starts[0] - t0 <= VISIBILITY + 3.0  # a lease, and one comeback


async def test_the_heartbeat_keeps_the_slot_of_a_long_job(app: App, clock: FakeClock) -> None:
    ledger = Ledger()

    @app.task(concurrency=1)
    async def long(n: int) -> None:
        ledger.start("long", clock.time())
        await clock.sleep(VISIBILITY * 5)  # far longer than one lease
        ledger.end("long")

    await long.enqueue(1)
    await long.enqueue(2)
    worker = app.worker(concurrency=5, poll=0.05, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: ledger.done == 2, step=0.1, within=120)
    assert ledger.peak["long"] == 1
    (first, _), (second, _) = ledger.starts
    assert second - first >= VISIBILITY * 5


async def test_a_lost_slot_stops_its_run(app: App, clock: FakeClock, store: CountingStore) -> None:
    started: list[str] = []

    @app.task(concurrency=1)
    async def long(n: int) -> None:
        started.append(current_job().id)
        await clock.sleep(1000)

    await long.enqueue(1)
    worker = app.worker(concurrency=5, poll=0.05, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: bool(started), step=0.05)
        # The store lost the slot (e.g. a partition outlived the lease): free it.
        (slot,) = worker._inflight.slots()
        assert await store.release_lease(*slot)
        await advance_until(
            clock, lambda: worker.counts.get(OutcomeName.LEASE_LOST, 0) == 1, step=0.1
        )


async def test_a_task_without_limits_pays_no_store_call(
    app: App, clock: FakeClock, store: CountingStore
) -> None:
    done: list[int] = []

    @app.task
    async def plain(n: int) -> None:
        done.append(n)

    assert plain.limits is None
    for n in range(10):
        await plain.enqueue(n)
    worker = app.worker(concurrency=5, poll=0.05, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: len(done) == 10)
    for call in ("acquire_lease", "release_lease", "take", "hold_unique", "free_unique"):
        assert store.calls[call] == 0, call


async def test_one_store_call_per_start_of_a_concurrency_limited_job(
    app: App, clock: FakeClock, store: CountingStore
) -> None:
    done: list[int] = []

    @app.task(concurrency=100)
    async def roomy(n: int) -> None:
        done.append(n)

    for n in range(10):
        await roomy.enqueue(n)
    worker = app.worker(concurrency=5, poll=0.05, clock=clock)
    async with running(worker, clock):
        await advance_until(clock, lambda: len(done) == 10)
    assert store.calls["acquire_lease"] == 10


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rate_limit": "5/d"}, "rate_limit"),
        ({"rate_limit": "0/s"}, "rate_limit"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 1, "limit_key": "nope"}, "limit_key 'nope'"),
        ({"limit_key": "tenant"}, "limit_key needs"),
    ],
)
def test_bad_limits_are_config_errors(app: App, options: dict[str, object], message: str) -> None:
    async def export(tenant: str) -> None: ...

    with pytest.raises(ConfigError, match=message):
        app.task(**options)(export)  # type: ignore[call-overload]


def test_limits_need_a_store_on_a_broker_without_one() -> None:
    app = App("amqp://guest:guest@127.0.0.1:5672/")

    @app.task(rate_limit="5/m")
    async def call_partner(n: int) -> None: ...

    with pytest.raises(ConfigError, match="store"):
        app.worker()


def test_a_limit_key_given_by_keyword_or_default_names_the_same_key() -> None:
    app = App("memory://")
    by_key: defaultdict[str, list[str]] = defaultdict(list)

    @app.task(concurrency=1, limit_key="tenant")
    async def export(month: int, tenant: str = "main") -> None: ...

    limits = export.limits
    assert limits is not None
    by_key[limits.name_for([1, "x"], {})].append("positional")
    by_key[limits.name_for([1], {"tenant": "x"})].append("keyword")
    by_key[limits.name_for([1], {})].append("default")
    assert dict(by_key) == {"export[x]": ["positional", "keyword"], "export[main]": ["default"]}


async def test_a_throttled_lambda_record_is_handed_to_the_queue_not_reported() -> None:
    from ..runtime.test_lambda_runtime import failures, record

    class SqsLike(MemoryBroker):
        """Publishes retries itself, as the sqs:// broker does for the Lambda adapter."""

        async def client(self) -> None:
            return None

    app = App(SqsLike(), store="memory://")
    ran: list[str] = []

    @app.task(concurrency=1)
    async def export(month: str) -> None:
        ran.append(month)

    assert await app.store.acquire_lease("export", "another-worker", limit=1, lease=60)
    result = await aioworkers.lambda_handler(app).handle({"Records": [record("export", "m")]})
    # Published again with a delay (the same attempt): reporting it as failed too would
    # have SQS deliver the original as well, and the job run twice.
    assert failures(result) == []
    assert ran == []
    assert (await app.stats()).delayed == 1


async def test_a_lone_waiters_comebacks_stay_within_a_step_and_a_half(clock: FakeClock) -> None:
    # The worst jitter every time: a line counted by throttles (not jobs) grew with each
    # comeback of one job, so it could start seconds after its slot freed.
    limiter = Limiter(None, lease=VISIBILITY, clock=clock, rand=lambda: 1.0)
    limits = Limits("export", concurrency=1, rate=None, per=1.0, key=None)
    seen = limiter._waiting("export")
    for _ in range(20):
        delay = limiter._comeback(limits, seen, 0.0, "job-1")
        assert delay <= 1.5 * FIRST_GUESS
        await clock.advance(delay * 0.4)  # back sooner than its comeback
    # A line of five jobs is spread over five steps; the last of them waits longest.
    delays = [limiter._comeback(limits, seen, 0.0, f"job-{n}") for n in range(1, 6)]
    assert delays[-1] == pytest.approx(0.5 + 5 * FIRST_GUESS)
    # Waiters not seen again within their longest comeback have left the line.
    await clock.advance(8 * FIRST_GUESS)
    assert limiter._comeback(limits, seen, 0.0, "job-9") == pytest.approx(1.5 * FIRST_GUESS)
