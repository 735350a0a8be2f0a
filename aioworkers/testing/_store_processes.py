"""Store conformance checks across processes: the store opened by URL in several spawned
processes, released together by a barrier, racing for the same slots, key and limit."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..store import open_store
from ..store.base import Store
from ._store_exercise import StoreExercise, store_check

PROCESSES = 4
START_WITHIN = 60.0  # seconds for every process to start and connect

Race = Callable[[Store, int, dict[str, Any]], Awaitable[Any]]


async def _slots(store: Store, index: int, params: dict[str, Any]) -> list[int]:
    name, slots = params["name"], params["slots"]
    won = await asyncio.gather(*(store.claim_slot(name, str(n), ttl=60) for n in range(slots)))
    return [n for n, ok in enumerate(won) if ok]


async def _claim(store: Store, index: int, params: dict[str, Any]) -> str:
    return await store.claim(params["key"], f"p{index}", lease=60)


async def _leases(store: Store, index: int, params: dict[str, Any]) -> list[tuple[float, float]]:
    """Each task takes a lease ``rounds`` times, holds it ``hold`` s, releases it; returns
    the spans it was sure to hold one (after acquiring, before releasing)."""
    key, limit, hold = params["key"], params["limit"], params["hold"]
    spans: list[tuple[float, float]] = []

    async def task(owner: str) -> None:
        for _ in range(params["rounds"]):
            while True:
                if await store.acquire_lease(key, owner, limit=limit, lease=60):
                    break
                await asyncio.sleep(0.002)
            start = time.time()
            await asyncio.sleep(hold)
            spans.append((start, time.time()))
            if not await store.release_lease(key, owner):
                raise AssertionError(f"{owner} lost its lease")

    await asyncio.gather(*(task(f"p{index}-t{t}") for t in range(params["tasks"])))
    return spans


_RACES: dict[str, Race] = {"slots": _slots, "claim": _claim, "leases": _leases}


async def _run(url: str, kind: str, index: int, params: dict[str, Any], barrier: Any) -> Any:
    store = open_store(url)
    try:
        await store.cancelled(["warm-up"])  # connected (or the file open) before the start
        barrier.wait(START_WITHIN)
        return await _RACES[kind](store, index, params)
    finally:
        await store.aclose()


def _main(
    url: str, kind: str, index: int, params: dict[str, Any], barrier: Any, results: Any
) -> None:
    try:
        results.put((index, True, asyncio.run(_run(url, kind, index, params, barrier))))
    except BaseException as exc:  # reported to the parent, which fails the check
        results.put((index, False, f"{type(exc).__name__}: {exc}"))


def race(url: str, kind: str, params: dict[str, Any], n: int = PROCESSES) -> list[Any]:
    """Run the race ``kind`` in ``n`` fresh processes at once; their results in order."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(n)
    results = context.Queue()
    processes = [
        context.Process(target=_main, args=(url, kind, i, params, barrier, results), daemon=True)
        for i in range(n)
    ]
    for process in processes:
        process.start()
    try:
        got = [results.get(timeout=START_WITHIN * 2) for _ in processes]
    finally:
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()
    failed = [value for _, ok, value in got if not ok]
    if failed:
        raise AssertionError(f"a racing process failed: {failed[0]}")
    return [value for _, _, value in sorted(got, key=lambda item: int(item[0]))]


@store_check(needs_url=True)
async def check_slots_are_claimed_once_across_processes(ex: StoreExercise) -> None:
    """Four processes claim the same 50 slots at once: each slot has exactly one winner."""
    assert ex.url is not None
    params = {"name": ex.name("schedule"), "slots": 50}
    won = await asyncio.to_thread(race, ex.url, "slots", params)
    counted = sorted(slot for slots in won for slot in slots)
    assert counted == list(range(50)), counted


@store_check(needs_url=True)
async def check_a_claim_has_one_winner_across_processes(ex: StoreExercise) -> None:
    """Four processes claim one idempotency key at once: exactly one gets it."""
    assert ex.url is not None
    got = await asyncio.to_thread(race, ex.url, "claim", {"key": ex.name()})
    assert sorted(got) == ["busy"] * (PROCESSES - 1) + ["claimed"]


@store_check(needs_url=True)
async def check_a_limit_holds_across_processes(ex: StoreExercise) -> None:
    """Four processes of five tasks each take turns under a limit of 3: at no instant do
    more than 3 hold a lease, and every turn happens."""
    assert ex.url is not None
    params = {"key": ex.name("limit"), "limit": 3, "hold": 0.01, "rounds": 3, "tasks": 5}
    spans = [
        span for spans in await asyncio.to_thread(race, ex.url, "leases", params) for span in spans
    ]
    assert len(spans) == PROCESSES * 5 * 3
    peak = most_at_once(spans)
    assert peak <= 3, f"{peak} held at once under a limit of 3"


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant (touching ones do not overlap). Each span lies
    within a real hold, so the spans overlap no more than the holds did."""
    events = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    peak = holding = 0
    for _, change in events:
        holding += change
        peak = max(peak, holding)
    return peak
