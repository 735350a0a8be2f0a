"""Redis-specific behaviour beyond the conformance suite, on the real server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlencode

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis._parsers.base import BaseParser

from aioworkers import AioworkersError, BrokerUnavailable, ConfigError, LeaseLost, QueueDepth
from aioworkers.brokers import redis as redis_broker
from aioworkers.brokers.redis import RedisBroker
from aioworkers.envelope import Envelope, encode, new_id, now_ms
from aioworkers.idempotency.base import StoreUnavailable
from aioworkers.store.redis import RedisStore

from ..proxy import Proxy
from ..services import REDIS, ensure
from .conftest import REDIS_URL, delete_prefix


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    ensure(REDIS)
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    await delete_prefix(name)


@pytest.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    ensure(REDIS)
    c = aioredis.from_url(REDIS_URL)
    yield c
    await c.aclose()


def make(prefix: str, consumer: str, visibility: float = 30.0) -> RedisBroker:
    return RedisBroker(
        f"{REDIS_URL}?prefix={prefix}", visibility_timeout=visibility, consumer=consumer
    )


async def test_every_key_of_a_queue_shares_one_cluster_slot(prefix: str) -> None:
    broker = make(prefix, "c1")
    keys = broker.keys("emails")
    names = [keys.stream, keys.delayed, keys.payloads, keys.dead]
    assert {k.split("}")[0] + "}" for k in names} == {f"{prefix}:{{emails}}"}
    await broker.aclose()


async def test_another_lease_than_the_horizon_holds_against_every_consumer(
    prefix: str, client: aioredis.Redis
) -> None:
    # Two workers of one app (horizon 0.4 s). Real timers: the server's idle times are
    # what is under test.
    owner, other = make(prefix, "owner", visibility=0.4), make(prefix, "other", visibility=0.4)
    await owner.publish("q", [b"long", b"short"])
    long, short = await owner.fetch("q", max_messages=2, wait=0.5)
    assert await owner.extend([long], lease=1.6) == []  # past the horizon: a deadline
    assert await owner.extend([short], lease=0.1) == []  # inside it: an idle time
    leases = owner.keys("q").leases
    assert await client.zrange(leases, 0, -1) == [long.message_id.encode()]

    await asyncio.sleep(0.5)  # past the horizon and the short lease
    (back,) = await other.fetch("q", max_messages=10, wait=0)
    assert (back.message_id, back.count) == (short.message_id, 2)
    assert await other.ack([back]) == []
    await asyncio.sleep(0.6)  # 1.1 s after the long extend: still the owner's
    assert await other.fetch("q", max_messages=10, wait=0) == []
    assert await owner.extend([long], lease=0.4) == []  # the horizon again: no deadline kept
    assert await client.zrange(leases, 0, -1) == []
    await asyncio.sleep(0.6)
    (taken,) = await other.fetch("q", max_messages=10, wait=0)
    assert (taken.message_id, taken.count) == (long.message_id, 2)
    assert await owner.ack([long, short]) == [long]  # taken over; short is acked and gone
    assert await other.ack([taken]) == []
    assert await other.depth("q") == QueueDepth()
    await owner.aclose()
    await other.aclose()


async def test_the_runtimes_calls_write_no_deadlines(prefix: str, client: aioredis.Redis) -> None:
    broker = make(prefix, "c1", visibility=30.0)
    await broker.publish("q", [b"a"])
    (d,) = await broker.fetch("q", max_messages=1, wait=0.5, lease=30.0)
    assert await broker.extend([d], lease=30.0) == []
    assert await client.exists(broker.keys("q").leases) == 0
    await broker.ack([d])
    await broker.aclose()


async def test_entries_not_written_by_aioworkers_are_handed_on_for_dead_lettering(
    prefix: str, client: aioredis.Redis
) -> None:
    broker = make(prefix, "c1")
    await client.xadd(broker.keys("q").stream, {"data": "hand-written"})
    (got,) = await broker.fetch("q", max_messages=10, wait=0.5)
    assert b"hand-written" in got.body  # the decode pipeline then dead-letters it
    await broker.ack([got])
    await broker.aclose()


async def test_a_lost_group_is_recreated_and_old_deliveries_settle_nothing(
    prefix: str, client: aioredis.Redis
) -> None:
    broker = make(prefix, "c1")
    await broker.publish("q", [b"before"])
    (old,) = await broker.fetch("q", max_messages=1, wait=0.5)
    # What a server restarted without persistence looks like: everything is gone.
    await client.delete(broker.keys("q").stream)
    assert await broker.fetch("q", max_messages=1, wait=0) == []
    await broker.ack([old])  # no error, nothing acked
    assert await broker.extend([old], lease=30) == [old]
    with pytest.raises(LeaseLost):
        await broker.retry(old, body=b"again", delay=0)
    await broker.publish("q", [b"after"])
    (new,) = await broker.fetch("q", max_messages=1, wait=0.5)
    assert new.body == b"after"
    await broker.ack([new])
    assert await broker.depth("q") == QueueDepth()
    await broker.aclose()


async def test_idle_consumers_of_dead_workers_are_pruned_but_busy_ones_kept(
    prefix: str, client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_broker, "PRUNE_IDLE", 0.0)
    dead = make(prefix, "dead-idle", visibility=0.2)
    busy = make(prefix, "busy", visibility=0.2)
    live = make(prefix, "live", visibility=0.2)
    await dead.publish("q", [b"a", b"b"])
    (a,) = await dead.fetch("q", max_messages=1, wait=0.5)
    await dead.ack([a])
    (b,) = await busy.fetch("q", max_messages=1, wait=0.5)
    await asyncio.sleep(2.2)  # every consumer idle longer than 10 x visibility
    assert await busy.extend([b], lease=0.2) == []  # b stays busy's, not reclaimable
    assert await live.fetch("q", max_messages=1, wait=0) == []  # reclaim finds nothing, sweeps
    stream = live.keys("q").stream
    names = {c["name"].decode() for c in await client.xinfo_consumers(stream, "workers")}
    assert "dead-idle" not in names
    assert "busy" in names  # it holds an entry: only a reclaim may take it
    await busy.ack([b])
    for broker in (dead, busy, live):
        await broker.aclose()


async def test_aclose_removes_its_consumer_only_when_it_holds_nothing(
    prefix: str, client: aioredis.Redis
) -> None:
    idle = make(prefix, "idle")
    holding = make(prefix, "holding")
    await idle.publish("q", [b"x"])
    (x,) = await idle.fetch("q", max_messages=1, wait=0.5)
    await idle.ack([x])
    stream = idle.keys("q").stream
    names = {c["name"].decode() for c in await client.xinfo_consumers(stream, "workers")}
    assert "idle" in names
    await idle.aclose()
    await holding.publish("q", [b"y"])
    (held,) = await holding.fetch("q", max_messages=1, wait=0.5)
    assert held.body == b"y"
    await holding.aclose()
    names = {c["name"].decode() for c in await client.xinfo_consumers(stream, "workers")}
    assert names == {"holding"}  # its pending entry keeps it, for others to reclaim


# -- network faults: a proxy between the broker and Redis ------------------------------------


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    ensure(REDIS)
    async with Proxy(REDIS.host, REDIS.port) as p:
        yield p


Through = Callable[..., RedisBroker]


@pytest.fixture
async def through(proxy: Proxy, prefix: str) -> AsyncIterator[Through]:
    """Makes brokers that reach Redis through ``proxy`` (closed after the test)."""
    made: list[RedisBroker] = []

    def make(consumer: str = "c1", **params: str) -> RedisBroker:
        query = urlencode({"prefix": prefix, **params})
        made.append(RedisBroker(f"redis://127.0.0.1:{proxy.port}/0?{query}", consumer=consumer))
        return made[-1]

    yield make
    for broker in made:
        await broker.aclose()


@pytest.mark.parametrize("delay", [0.0, 30.0])
async def test_a_publish_whose_reply_is_lost_adds_the_job_once(
    client: aioredis.Redis, proxy: Proxy, through: Through, delay: float
) -> None:
    broker = through()
    await broker.publish("warm", [b"w"], delay=delay)  # connected, scripts loaded
    proxy.drop_next_reply()
    # The client does not know whether the first send was applied and sends it again.
    await broker.publish("q", [b"one", b"two"], delay=delay)
    assert proxy.dropped_replies == 1
    keys = broker.keys("q")
    if delay:
        assert await client.zcard(keys.delayed) == 2
        assert sorted(await client.hvals(keys.payloads)) == [b"one", b"two"]
    else:
        entries = await client.xrange(keys.stream)
        assert sorted(fields[b"b"] for _, fields in entries) == [b"one", b"two"]


async def test_an_idle_fetch_blocks_past_the_socket_timeout_without_failing(
    through: Through,
) -> None:
    # socket_timeout bounds the wait for a reply beyond a blocking read's own wait: an idle
    # fetch with a poll longer than it returns empty, it does not time out (and warn).
    broker = through(socket_timeout="0.3")
    start = time.monotonic()
    assert await broker.fetch("q", max_messages=1, wait=1.0) == []
    assert time.monotonic() - start >= 0.9  # it did block for the whole wait


async def test_every_call_on_a_black_holed_connection_fails_within_its_deadline(
    proxy: Proxy, through: Through
) -> None:
    broker = through(socket_timeout="0.5")
    await broker.publish("q", [b"held", b"later"])
    (held,) = await broker.fetch("q", max_messages=1, wait=0)
    proxy.pause()  # sockets stay open, nothing gets through: no error, no reply
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "fetch": lambda: broker.fetch("q", max_messages=1, wait=0.5),
        "publish": lambda: broker.publish("q", [b"lost"]),
        "ack": lambda: broker.ack([held]),
        "extend": lambda: broker.extend([held], lease=30),
        "depth": lambda: broker.depth("q"),
    }
    for name, call in calls.items():
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            # wait_for only so that a regression fails here instead of hanging the run
            await asyncio.wait_for(call(), 10)
        took = time.monotonic() - start
        allowed = 0.5 + (0.5 if name == "fetch" else 0.0)  # the reply timeout, plus the wait
        assert took < allowed + 0.5, f"{name} took {took:.2f}s"

    proxy.resume()  # the timed-out connections were dropped; fresh ones work
    (later,) = await broker.fetch("q", max_messages=1, wait=1.0)
    assert later.body == b"later"
    assert await broker.ack([held, later]) == []
    # "lost" was sent into the black hole: never applied, so never a phantom entry either.
    assert await broker.depth("q") == QueueDepth()


async def test_a_black_holed_fetch_fails_by_default_within_the_wait_and_5_seconds(
    proxy: Proxy, through: Through
) -> None:
    # The default, with no socket_timeout in the URL. This one waits for the real 5 s
    # reply timeout: the default is what is under test.
    broker = through()
    assert await broker.fetch("q", max_messages=1, wait=0) == []
    proxy.pause()
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(broker.fetch("q", max_messages=1, wait=0.5), 30)
    assert time.monotonic() - start < 5.0 + 0.5 + 1.0  # the default reply timeout, the wait


async def test_wrong_type_and_wrong_password_are_config_errors_naming_the_fix(
    prefix: str, client: aioredis.Redis
) -> None:
    broker = make(prefix, "c1")
    await client.set(broker.keys("q").stream, "not a stream")
    with pytest.raises(ConfigError, match=r"WRONGTYPE.*choose another prefix"):
        await broker.fetch("q", max_messages=1, wait=0)
    await broker.aclose()

    denied = RedisBroker(f"redis://nobody:wrong@{REDIS.host}:{REDIS.port}/0?prefix={prefix}")
    with pytest.raises(ConfigError, match="check the user name and password") as info:
        await denied.publish("q", [b"x"])
    assert "wrong" not in str(info.value)
    await denied.aclose()


def _reply(text: str) -> rexc.ResponseError:
    """The exception redis-py raises for an error reply ``text`` (as the server sends it)."""
    error = BaseParser.parse_error(text)
    assert isinstance(error, rexc.RedisError)
    return error  # type: ignore[return-value]


TRANSIENT = [
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "LOADING Redis is loading the dataset in memory",
    "READONLY You can't write against a read only replica.",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "NOREPLICAS Not enough good replicas to write.",
    "TRYAGAIN Multiple keys request during rehashing of slot",
    "CLUSTERDOWN The cluster is down",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist "
    "to disk. Commands that may modify the data set are disabled",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "NOSCRIPT No matching script. Please use EVAL.",
    "ERR Script killed by user with SCRIPT KILL...",
    "ERR max number of clients reached",
    "SOMENEWCODE a reply no table knows",
    # A script's error on Redis 6, the code quoted inside an ERR:
    "ERR Error running script (call to f_1): @user_script:3: -BUSY Redis is busy",
]
PERMANENT = [
    "NOPERM this user has no permissions to run the 'xack' command",
    "ERR The user executing the script can't run this command or subcommand script: 9d7, "
    "on @user_script:1.",
    "NOPERM this user has no permissions to access one of the keys used as arguments",
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "WRONGPASS invalid username-password pair or user is disabled.",
    "NOAUTH Authentication required.",
    "ERR unknown command 'XAUTOCLAIM', with args beginning with: ",
    "ERR Unknown Redis command called from script script: 80c, on @user_script:1.",
    "MOVED 3999 127.0.0.1:6381",
    "ERR Error running script (call to f_1): @user_script:2: -WRONGTYPE Operation against a key",
]


@pytest.mark.parametrize("reply", TRANSIENT)
@pytest.mark.parametrize("unavailable", [BrokerUnavailable, StoreUnavailable])
def test_transient_replies_become_unavailable(
    reply: str, unavailable: type[AioworkersError]
) -> None:
    mapped = redis_broker.map_error(_reply(reply), unavailable)
    assert type(mapped) is unavailable
    assert reply.split(" ", 1)[1][:20] in str(mapped)  # the reply is in the warning


@pytest.mark.parametrize("reply", PERMANENT)
@pytest.mark.parametrize("unavailable", [BrokerUnavailable, StoreUnavailable])
def test_permanent_replies_become_config_errors(
    reply: str, unavailable: type[AioworkersError]
) -> None:
    mapped = redis_broker.map_error(_reply(reply), unavailable)
    assert type(mapped) is ConfigError
    assert reply.split(" ", 1)[1][:20] in str(mapped)
    assert any(fix in str(mapped) for fix in redis_broker.PERMANENT_CODES.values())


@pytest.mark.parametrize(
    "error",
    [
        rexc.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
        rexc.TimeoutError("Timeout reading from socket"),
        rexc.InvalidResponse("Protocol Error: b'x'"),
        rexc.MaxConnectionsError("Too many connections"),
    ],
)
def test_connection_failures_become_unavailable(error: rexc.RedisError) -> None:
    assert type(redis_broker.map_error(error, BrokerUnavailable)) is BrokerUnavailable


def test_a_lost_group_is_told_apart_and_a_bad_argument_is_not_the_servers_doing() -> None:
    lost = redis_broker.map_error(_reply("NOGROUP No such key 's' or group 'g'"), BrokerUnavailable)
    assert isinstance(lost, BrokerUnavailable)
    assert type(lost) is not BrokerUnavailable  # the broker re-creates the group on it
    assert (
        redis_broker.map_error(rexc.DataError("Invalid input of type"), BrokerUnavailable) is None
    )


async def test_a_job_the_worker_delays_comes_back_on_time_while_the_fetch_long_polls(
    prefix: str,
) -> None:
    # poll=5: once the job is fetched, the next fetch long-polls an empty stream for 5 s.
    # The retry (0.2 s) is written after that poll began, so only the worker's own timer
    # can bring it back before the poll ends. Real timers: the long poll is under test.
    import aioworkers

    app = aioworkers.App(f"{REDIS_URL}?prefix={prefix}")
    runs: list[float] = []
    again = asyncio.Event()

    @app.task(retries=1, backoff=0.2)
    async def flaky() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise RuntimeError("once")
        again.set()

    await flaky.enqueue()
    async with app.worker(concurrency=4, poll=5.0):
        await asyncio.wait_for(again.wait(), 4.5)
    await app.aclose()
    assert 0.1 <= runs[1] - runs[0] < 2.5  # the backoff (0.2 s, jittered), not a poll


# -- cancel marks, read by the fetch that hands the jobs out ----------------------------------


@pytest.fixture
async def store(prefix: str) -> AsyncIterator[RedisStore]:
    """A state store on the broker's server: its cancel marks are read by the fetch."""
    s = RedisStore(f"{REDIS_URL}?prefix={prefix}:store")
    yield s
    await s.aclose()


def bodies(n: int) -> tuple[list[str], list[bytes]]:
    envs = [Envelope(new_id(), "t", [], {}, enqueued_at=now_ms()) for _ in range(n)]
    return [env.id for env in envs], [encode(env) for env in envs]


@pytest.mark.parametrize("protocol", ["2", "3"])
async def test_a_blocking_fetch_reads_the_marks_of_the_jobs_it_waited_for(
    prefix: str, store: RedisStore, client: aioredis.Redis, protocol: str
) -> None:
    broker = RedisBroker(
        f"{REDIS_URL}?prefix={prefix}&protocol={protocol}", visibility_timeout=30, consumer="c1"
    )
    producer = make(prefix, "producer")
    assert broker.screen_cancel_marks(*store.cancel_marks_at())
    (held_id,), held_body = bodies(1)
    await producer.publish("q", held_body)
    (held,), screened = await broker.fetch_screened("q", max_messages=10, wait=0)
    assert screened == [(held_id, False)]  # held on: not screened again below
    ids, jobs = bodies(3)
    await store.mark_cancelled(ids[1], ttl=60)
    odd = b'{"v":1,"id":"not one of ours"}'  # outside the id pattern: left to the runtime

    async def publish_later() -> None:
        await asyncio.sleep(0.3)  # the fetch below blocks by then (nothing was ready)
        await producer.publish("q", [*jobs, odd])
        await client.xadd(broker.keys("q").stream, {"data": "hand-written"})

    later = asyncio.create_task(publish_later())
    start = time.monotonic()
    got, screened = await broker.fetch_screened("q", max_messages=10, wait=5.0)
    assert time.monotonic() - start < 2.0  # woken by the publish, not the end of the wait
    await later
    assert [d.body for d in got] == [*jobs, odd]  # one script's XADDs: served together
    assert screened == [(ids[0], False), (ids[1], True), (ids[2], False), None]
    (foreign,), screened = await broker.fetch_screened("q", max_messages=10, wait=1.0)
    assert b"hand-written" in foreign.body
    assert screened == [None]
    assert await broker.ack([held, *got, foreign]) == []
    assert await broker.depth("q") == QueueDepth()
    await broker.aclose()
    await producer.aclose()


async def test_consumers_blocked_together_each_read_the_marks_of_their_own_jobs(
    prefix: str, store: RedisStore
) -> None:
    # Both read the group's position before blocking; the job the first is handed lies past
    # the second's too, and must not be taken for the second's.
    one, two = make(prefix, "c1"), make(prefix, "c2")
    for broker in (one, two):
        assert broker.screen_cancel_marks(*store.cancel_marks_at())
    ids, jobs = bodies(2)
    await store.mark_cancelled(ids[0], ttl=60)
    fetches = [
        asyncio.create_task(b.fetch_screened("q", max_messages=10, wait=5.0)) for b in (one, two)
    ]
    await asyncio.sleep(0.3)  # both block by then
    for job in jobs:
        await one.publish("q", [job])
        await asyncio.sleep(0.1)
    results = await asyncio.gather(*fetches)
    seen = {}
    for got, screened in results:
        assert len(got) == len(screened) == 1
        seen[got[0].body] = screened[0]
    assert seen == {jobs[0]: (ids[0], True), jobs[1]: (ids[1], False)}
    for broker, (got, _) in zip((one, two), results, strict=True):
        assert await broker.ack(got) == []
        await broker.aclose()


async def test_the_jobs_of_a_short_read_start_before_the_next_read_is_sent(prefix: str) -> None:
    # Latency: the queue ran dry, so sending the next read (which only waits) comes after
    # starting what the last one returned, not before.
    import aioworkers

    app = aioworkers.App(f"{REDIS_URL}?prefix={prefix}")
    broker = app.broker
    assert isinstance(broker, RedisBroker)
    reads = 0
    real = broker._fetch

    async def counted(*args: object, **kwargs: object) -> object:
        nonlocal reads
        reads += 1
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    broker._fetch = counted  # type: ignore[method-assign]
    reads_at_start: list[int] = []
    done = asyncio.Event()

    @app.task
    async def ping() -> None:
        reads_at_start.append(reads)
        done.set()

    await ping.enqueue()
    async with app.worker(concurrency=10, poll=1.0):
        await asyncio.wait_for(done.wait(), 5)
    await app.aclose()
    assert reads_at_start == [1]  # the read that returned it; the next one not sent yet
