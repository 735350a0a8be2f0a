"""Store conformance checks: idempotency claims, schedule slots, limit leases, token
buckets, unique keys and the one-call heartbeat."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..store.base import IdempotencyStore, Store
from ._store_exercise import StoreExercise, store_check

# Keys come from users: spaces, separators, braces, unicode and glob characters are data.
ODD_KEYS = ["a b", "x:y:z", "a|job|b", "{tag}", "ключ", "*", "k?[1]", ""]


@store_check()
async def check_is_a_store(ex: StoreExercise) -> None:
    """The store implements the whole `Store` protocol (and so `IdempotencyStore`)."""
    assert isinstance(ex.store, Store)
    assert isinstance(ex.store, IdempotencyStore)


@store_check()
async def check_claims_follow_their_owner(ex: StoreExercise) -> None:
    """A claim is busy for everyone (its owner too); only its owner completes or releases
    it; a done key is done for everyone and no longer held by its owner."""
    s, k, other = ex.store, ex.name(), ex.name()
    assert await s.claim(k, "a", lease=60) == "claimed"
    assert await s.claim(k, "b", lease=60) == "busy"
    assert await s.claim(k, "a", lease=60) == "busy"
    assert await s.claim(other, "a", lease=60) == "claimed"
    assert await s.complete(k, "b", ttl=60) is False
    assert await s.release(k, "b") is False
    assert await s.extend([(k, "a"), (k, "b")], lease=60) == [(k, "b")]
    assert await s.release(k, "a") is True
    assert await s.release(k, "a") is False
    assert await s.claim(k, "b", lease=60) == "claimed"
    assert await s.complete(k, "b", ttl=60) is True
    assert await s.claim(k, "c", lease=60) == "done"
    assert await s.claim(k, "b", lease=60) == "done"
    assert await s.complete(k, "b", ttl=60) is False
    assert await s.release(k, "b") is False
    assert await s.extend([(k, "b")], lease=60) == [(k, "b")]
    assert await s.claim(other, "b", lease=60) == "busy"
    assert await s.extend([], lease=60) == []


@store_check()
async def check_claims_lapse_unless_extended(ex: StoreExercise) -> None:
    """A claim not extended lapses after its lease (its owner can no longer complete
    it); one extended stays busy past it."""
    s, lapsing, kept = ex.store, ex.name(), ex.name()
    assert await s.claim(lapsing, "a", lease=ex.ttl) == "claimed"
    assert await s.claim(kept, "a", lease=ex.ttl) == "claimed"
    for _ in range(3):
        await ex.elapse(ex.ttl / 2)
        assert await s.extend([(kept, "a")], lease=ex.ttl) == []
    await ex.elapse(ex.slack)
    assert await s.complete(lapsing, "a", ttl=60) is False
    assert await s.extend([(lapsing, "a")], lease=ex.ttl) == [(lapsing, "a")]
    assert await s.claim(lapsing, "b", lease=60) == "claimed"
    assert await s.claim(kept, "b", lease=60) == "busy"
    assert await s.complete(kept, "a", ttl=60) is True


@store_check()
async def check_a_done_key_lapses_after_its_ttl(ex: StoreExercise) -> None:
    """A done key is remembered for its TTL (counted from completion), then free."""
    s, k = ex.store, ex.name()
    assert await s.claim(k, "a", lease=60) == "claimed"
    assert await s.complete(k, "a", ttl=ex.ttl) is True
    assert await s.claim(k, "b", lease=60) == "done"
    await ex.lapse()
    assert await s.claim(k, "b", lease=60) == "claimed"


@store_check()
async def check_racing_claims_have_one_winner(ex: StoreExercise) -> None:
    """Fifty owners claim one key at once: one wins, and only it completes the key."""
    s, k = ex.store, ex.name()
    got = await asyncio.gather(*(s.claim(k, f"o{i}", lease=60) for i in range(50)))
    assert sorted(got) == ["busy"] * 49 + ["claimed"]
    done = await asyncio.gather(*(s.complete(k, f"o{i}", ttl=60) for i in range(50)))
    assert [i for i, ok in enumerate(done) if ok] == [got.index("claimed")]


@store_check()
async def check_odd_keys_are_data(ex: StoreExercise) -> None:
    """Keys with spaces, separators, braces, unicode or glob characters are kept apart."""
    s, tag = ex.store, ex.name()
    for key in ODD_KEYS:
        assert await s.claim(tag + key, "a", lease=60) == "claimed"
        assert await s.hold_unique(tag + key, "job-1", ttl=60) is None
        assert await s.acquire_lease(tag + key, "a", limit=1, lease=60) is True
    for key in ODD_KEYS:
        assert await s.claim(tag + key, "b", lease=60) == "busy"
        assert await s.complete(tag + key, "a", ttl=60) is True
        assert await s.hold_unique(tag + key, "job-2", ttl=60) == "job-1"
        assert await s.acquire_lease(tag + key, "b", limit=1, lease=60) is False
    # The state of a key is not an idempotency claim of the same text.
    assert await s.claim(f"{tag}|unique|{tag}", "a", lease=60) == "claimed"


@store_check()
async def check_a_slot_is_claimed_once(ex: StoreExercise) -> None:
    """The first claim of a (name, slot) wins, every later one loses until the TTL ends;
    names and slots are not confused however they split."""
    s, name = ex.store, ex.name("schedule")
    assert await s.claim_slot(name, "2024-01-01T00:00", ttl=ex.ttl) is True
    assert await s.claim_slot(name, "2024-01-01T00:00", ttl=ex.ttl) is False
    assert await s.claim_slot(name, "2024-01-01T00:01", ttl=60) is True
    assert await s.claim_slot(name + ":a", "b", ttl=60) is True
    assert await s.claim_slot(name, "a:b", ttl=60) is True
    await ex.lapse()
    assert await s.claim_slot(name, "2024-01-01T00:00", ttl=60) is True
    assert await s.claim_slot(name, "2024-01-01T00:01", ttl=60) is False


@store_check()
async def check_racing_slot_claims_have_one_winner(ex: StoreExercise) -> None:
    """Fifty claims of one slot at once: exactly one wins."""
    s, name = ex.store, ex.name("schedule")
    got = await asyncio.gather(*(s.claim_slot(name, "slot", ttl=60) for _ in range(50)))
    assert got.count(True) == 1


@store_check()
async def check_leases_up_to_the_limit(ex: StoreExercise) -> None:
    """At most ``limit`` owners hold leases of a key; an owner that holds one keeps it
    when it acquires again; a release frees a place; only the holder releases."""
    s, k = ex.store, ex.name("limit")
    assert [await s.acquire_lease(k, o, limit=2, lease=60) for o in "abc"] == [True, True, False]
    assert await s.acquire_lease(k, "a", limit=2, lease=60) is True  # already held
    assert await s.release_lease(k, "c") is False
    assert await s.release_lease(k, "a") is True
    assert await s.release_lease(k, "a") is False
    assert await s.acquire_lease(k, "c", limit=2, lease=60) is True
    assert await s.acquire_lease(k, "a", limit=2, lease=60) is False
    # A larger limit given later counts the same holders.
    assert await s.acquire_lease(k, "a", limit=3, lease=60) is True
    assert await s.acquire_lease(ex.name("limit"), "z", limit=1, lease=60) is True


@store_check()
async def check_leases_lapse_unless_extended(ex: StoreExercise) -> None:
    """A lease not extended lapses and frees its place; `extend_leases` keeps the others
    and reports those no longer held."""
    s, k = ex.store, ex.name("limit")
    assert await s.acquire_lease(k, "kept", limit=2, lease=ex.ttl) is True
    assert await s.acquire_lease(k, "lapsing", limit=2, lease=ex.ttl) is True
    assert await s.acquire_lease(k, "third", limit=2, lease=60) is False
    for _ in range(3):
        await ex.elapse(ex.ttl / 2)
        assert await s.extend_leases([(k, "kept")], lease=ex.ttl) == []
    await ex.elapse(ex.slack)
    assert await s.extend_leases([(k, "kept"), (k, "lapsing")], lease=ex.ttl) == [(k, "lapsing")]
    assert await s.release_lease(k, "lapsing") is False
    assert await s.acquire_lease(k, "third", limit=2, lease=60) is True
    assert await s.extend_leases([], lease=60) == []


@store_check()
async def check_racing_acquires_never_pass_the_limit(ex: StoreExercise) -> None:
    """Forty tasks take turns under a limit of 3: never more than 3 hold at once, and the
    places are used."""
    s, k = ex.store, ex.name("limit")
    holding = peak = done = 0

    async def worker(owner: str) -> None:
        nonlocal holding, peak, done
        for _ in range(3):
            while True:
                if await s.acquire_lease(k, owner, limit=3, lease=60):
                    break
                await asyncio.sleep(0.001)
            holding += 1
            peak = max(peak, holding)
            await asyncio.sleep(0.002)
            holding -= 1
            assert await s.release_lease(k, owner) is True
            done += 1

    await asyncio.gather(*(worker(f"o{i}") for i in range(40)))
    assert done == 120
    assert peak == 3


@store_check()
async def check_a_token_bucket_at_given_times(ex: StoreExercise) -> None:
    """A bucket of 2 tokens a second: two at once, then a wait for the next half token;
    refilled with time, never above its size; keys are independent."""
    s, k, t = ex.store, ex.name("bucket"), 1_800_000_000.0
    take = s.take
    assert await take(k, rate=2, per=1, now=t) == 0.0
    assert await take(k, rate=2, per=1, now=t) == 0.0
    assert abs(await take(k, rate=2, per=1, now=t) - 0.5) < 1e-6
    assert abs(await take(k, rate=2, per=1, now=t + 0.25) - 0.25) < 1e-6
    assert await take(k, rate=2, per=1, now=t + 0.5) == 0.0
    assert await take(ex.name("bucket"), rate=2, per=1, now=t + 0.5) == 0.0
    # Ten seconds idle fill it to its size, no more.
    assert [await take(k, rate=2, per=1, now=t + 10) for _ in range(3)][:2] == [0.0, 0.0]


@store_check()
async def check_a_token_bucket_on_the_store_clock(ex: StoreExercise) -> None:
    """Without ``now``, the store's clock: 3 tokens a minute give 3 at once, then a wait
    of about 20 seconds."""
    s, k = ex.store, ex.name("bucket")
    assert [await s.take(k, rate=3, per=60) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = await s.take(k, rate=3, per=60)
    assert 15 < wait <= 20


@store_check()
async def check_unique_keys_have_one_holder(ex: StoreExercise) -> None:
    """A unique key is held by one job: others get its id; it renews its own hold; only
    it frees the key; a hold lapses after its TTL."""
    s, k = ex.store, ex.name("unique")
    assert await s.hold_unique(k, "job-1", ttl=ex.ttl) is None
    assert await s.hold_unique(k, "job-2", ttl=60) == "job-1"
    assert await s.hold_unique(k, "job-1", ttl=ex.ttl) is None
    assert await s.free_unique(k, "job-2") is False
    assert await s.free_unique(k, "job-1") is True
    assert await s.free_unique(k, "job-1") is False
    assert await s.hold_unique(k, "job-2", ttl=ex.ttl) is None
    await ex.lapse()
    assert await s.hold_unique(k, "job-3", ttl=60) is None
    assert await s.free_unique(k, "job-2") is False
    racing = await asyncio.gather(*(s.hold_unique(ex.name(), f"j{i}", ttl=60) for i in range(2)))
    assert racing == [None, None]  # two keys
    key = ex.name("unique")
    racing = await asyncio.gather(*(s.hold_unique(key, f"j{i}", ttl=60) for i in range(20)))
    assert racing.count(None) == 1
    winner = f"j{racing.index(None)}"
    assert all(r in (None, winner) for r in racing)


@store_check()
async def check_one_beat_extends_claims_and_leases_and_reads_cancel_marks(
    ex: StoreExercise,
) -> None:
    """`beat` does the heartbeat's three calls at once: claims and leases extended (lost
    ones reported), and the watched jobs' cancel marks read."""
    s, claim, limit = ex.store, ex.name(), ex.name("limit")
    job, other = ex.name("job"), ex.name("job")
    assert await s.claim(claim, "a", lease=ex.ttl) == "claimed"
    assert await s.acquire_lease(limit, "a", limit=1, lease=ex.ttl) is True
    assert await s.mark_cancelled(job, ttl=60) is True
    beat = await s.beat(
        lease=60,
        claims=[(claim, "a"), (claim, "b")],
        leases=[(limit, "a"), (limit, "b")],
        watch=[job, other],
    )
    assert beat.lost_claims == [(claim, "b")]
    assert beat.lost_leases == [(limit, "b")]
    assert beat.cancelled == {job}
    await ex.lapse()  # extended to 60 s: still held
    assert await s.claim(claim, "b", lease=60) == "busy"
    assert await s.acquire_lease(limit, "b", limit=1, lease=60) is False
    empty = await s.beat(lease=60)
    assert (empty.lost_claims, empty.lost_leases, empty.cancelled) == ([], [], set())


@store_check()
async def check_bad_arguments_are_refused(ex: StoreExercise) -> None:
    """Zero or negative TTLs and leases, a limit or rate below 1: `ValueError`."""
    s, k = ex.store, ex.name()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: s.claim(k, "a", lease=0),
        lambda: s.complete(k, "a", ttl=-1),
        lambda: s.claim_slot(k, "s", ttl=0),
        lambda: s.acquire_lease(k, "a", limit=0, lease=1),
        lambda: s.acquire_lease(k, "a", limit=1, lease=0),
        lambda: s.take(k, rate=0, per=1),
        lambda: s.take(k, rate=1, per=0),
        lambda: s.hold_unique(k, "j", ttl=0),
        lambda: s.mark_cancelled(k, ttl=0),
        lambda: s.put_job(ex.record(k), ttl=0),
    ]
    for number, call in enumerate(calls):
        try:
            await call()
        except ValueError:
            continue
        raise AssertionError(f"call {number} accepted a bad argument")
