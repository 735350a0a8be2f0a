"""`MemoryStore` semantics as tables: each case is a script of store calls and clock ticks,
with the result every call must return. Lease 10 s, TTL 100 s, on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from aioworkers.idempotency import IdempotencyStore, MemoryStore

LEASE = 10.0
TTL = 100.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# Steps: ("claim", key, owner, result), ("complete", key, owner, result),
# ("release", key, owner, result), ("extend", [(key, owner), ...], lost), ("tick", seconds).
Step = tuple[Any, ...]

CASES: dict[str, list[Step]] = {
    "a free key is claimed": [("claim", "k", "a", "claimed")],
    "a claimed key is busy for others": [
        ("claim", "k", "a", "claimed"),
        ("claim", "k", "b", "busy"),
    ],
    "a claimed key is busy for its own owner too": [
        ("claim", "k", "a", "claimed"),
        ("claim", "k", "a", "busy"),
    ],
    "keys are independent": [
        ("claim", "k", "a", "claimed"),
        ("claim", "other", "a", "claimed"),
        ("complete", "k", "a", True),
        ("claim", "other", "b", "busy"),
    ],
    "a claim lapses after its lease": [
        ("claim", "k", "a", "claimed"),
        ("tick", LEASE - 0.001),
        ("claim", "k", "b", "busy"),
        ("tick", 0.001),
        ("claim", "k", "b", "claimed"),
    ],
    "completed by its owner, a key is done": [
        ("claim", "k", "a", "claimed"),
        ("complete", "k", "a", True),
        ("claim", "k", "b", "done"),
        ("claim", "k", "a", "done"),
    ],
    "a done key is kept for the ttl, then freed": [
        ("claim", "k", "a", "claimed"),
        ("complete", "k", "a", True),
        ("tick", TTL - 0.001),
        ("claim", "k", "b", "done"),
        ("tick", 0.001),
        ("claim", "k", "b", "claimed"),
    ],
    "the ttl runs from completion, not from the claim": [
        ("claim", "k", "a", "claimed"),
        ("tick", LEASE - 1),
        ("complete", "k", "a", True),
        ("tick", TTL - 1),
        ("claim", "k", "b", "done"),
    ],
    "only the owner completes": [
        ("claim", "k", "a", "claimed"),
        ("complete", "k", "b", False),
        ("claim", "k", "c", "busy"),
    ],
    "a lapsed claim is not completed": [
        ("claim", "k", "a", "claimed"),
        ("tick", LEASE),
        ("complete", "k", "a", False),
        ("claim", "k", "b", "claimed"),
    ],
    "a stalled owner cannot complete over the next owner": [
        ("claim", "k", "a", "claimed"),
        ("tick", LEASE),
        ("claim", "k", "b", "claimed"),
        ("complete", "k", "a", False),
        ("release", "k", "a", False),
        ("claim", "k", "c", "busy"),
        ("complete", "k", "b", True),
    ],
    "completing twice: the second finds it done": [
        ("claim", "k", "a", "claimed"),
        ("complete", "k", "a", True),
        ("complete", "k", "a", False),
    ],
    "a free key is not completed": [
        ("complete", "k", "a", False),
        ("claim", "k", "a", "claimed"),
    ],
    "released by its owner, a key is free again": [
        ("claim", "k", "a", "claimed"),
        ("release", "k", "a", True),
        ("claim", "k", "b", "claimed"),
    ],
    "only the owner releases": [
        ("claim", "k", "a", "claimed"),
        ("release", "k", "b", False),
        ("claim", "k", "b", "busy"),
    ],
    "a done key is not released": [
        ("claim", "k", "a", "claimed"),
        ("complete", "k", "a", True),
        ("release", "k", "a", False),
        ("claim", "k", "b", "done"),
    ],
    "extend keeps a claim past its first lease": [
        ("claim", "k", "a", "claimed"),
        ("tick", LEASE - 1),
        ("extend", [("k", "a")], []),
        ("tick", LEASE - 1),
        ("claim", "k", "b", "busy"),
        ("tick", 1),
        ("claim", "k", "b", "claimed"),
    ],
    "extend reports claims held by others, and leaves them alone": [
        ("claim", "k", "a", "claimed"),
        ("extend", [("k", "b")], [("k", "b")]),
        ("tick", LEASE),
        ("claim", "k", "c", "claimed"),
    ],
    "extend reports lapsed, done, released and unknown claims": [
        ("claim", "lapsed", "a", "claimed"),
        ("claim", "done", "a", "claimed"),
        ("claim", "released", "a", "claimed"),
        ("claim", "kept", "a", "claimed"),
        ("complete", "done", "a", True),
        ("release", "released", "a", True),
        ("tick", LEASE - 1),
        ("extend", [("kept", "a")], []),
        ("tick", 1),
        (
            "extend",
            [("lapsed", "a"), ("done", "a"), ("released", "a"), ("kept", "a"), ("new", "a")],
            [("lapsed", "a"), ("done", "a"), ("released", "a"), ("new", "a")],
        ),
        ("claim", "done", "b", "done"),
        ("claim", "kept", "b", "busy"),
    ],
    "extend does not revive a done key into a claim": [
        ("claim", "k", "a", "claimed"),
        ("complete", "k", "a", True),
        ("extend", [("k", "a")], [("k", "a")]),
        ("claim", "k", "b", "done"),
    ],
    "extending nothing is a no-op": [("extend", [], [])],
}


async def play(store: IdempotencyStore, clock: Clock, steps: list[Step]) -> None:
    for number, step in enumerate(steps, 1):
        op, *args = step
        got: Any
        if op == "tick":
            clock.now += args[0]
            continue
        if op == "claim":
            key, owner, expected = args
            got = await store.claim(key, owner, lease=LEASE)
        elif op == "complete":
            key, owner, expected = args
            got = await store.complete(key, owner, ttl=TTL)
        elif op == "release":
            key, owner, expected = args
            got = await store.release(key, owner)
        elif op == "extend":
            claims, expected = args
            got = await store.extend(claims, lease=LEASE)
        else:
            raise AssertionError(f"unknown step {op!r}")
        assert got == expected, f"step {number} {step}: got {got!r}"


@pytest.mark.parametrize("steps", list(CASES.values()), ids=list(CASES))
async def test_memory_store(steps: list[Step]) -> None:
    clock = Clock()
    await play(MemoryStore(clock=clock), clock, steps)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.claim("k", "a", lease=0), id="claim-lease-0"),
        pytest.param(lambda s: s.claim("k", "a", lease=-1), id="claim-lease-negative"),
        pytest.param(lambda s: s.extend([("k", "a")], lease=0), id="extend-lease-0"),
        pytest.param(lambda s: s.complete("k", "a", ttl=0), id="complete-ttl-0"),
    ],
)
async def test_non_positive_times_are_refused(call: Any) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        await call(MemoryStore())


async def test_expired_keys_are_swept_so_memory_stays_bounded() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    for round_ in range(10):
        for i in range(1000):
            key = f"{round_}:{i}"
            assert await store.claim(key, "a", lease=LEASE) == "claimed"
            assert await store.complete(key, "a", ttl=TTL)
        clock.now += TTL  # every key of this round is now expired and never read again
    assert len(store._claims) <= 2048
    assert isinstance(store, IdempotencyStore)
