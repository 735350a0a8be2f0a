"""What the store conformance checks run on: the store under test with its timings
(`StoreCase`), helpers that let time pass on a real or a fake clock (`StoreExercise`),
and the check registry. Nothing here imports pytest."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..store.base import JobRecord, Store
from .clock import FakeClock


@dataclass(frozen=True)
class StoreCase:
    """The store under test and the timings the suite may rely on with it.

    ``ttl``: a short TTL or lease the suite lets lapse, seconds.
    ``slack``: how late the store may lapse it (timer resolution, clock skew).
    ``clock``: the `FakeClock` a memory store keeps its time on, if any: the suite then
    moves it instead of sleeping, so ``ttl`` may be long at no cost.
    ``url``: a URL ``aioworkers.store.open_store`` opens as the same store again: in this
    process (a second client: waits across clients) and in other processes (races across
    processes). Without one, those checks are skipped.
    ``timeout``: real seconds one check may take before it fails.
    """

    store: Store
    ttl: float = 0.3
    slack: float = 0.2
    clock: FakeClock | None = None
    url: str | None = None
    name: str = ""
    timeout: float = 60.0


@dataclass(frozen=True)
class StoreCheck:
    """One conformance check: a coroutine function of a `StoreExercise`, and whether it
    needs ``url`` (a second client or other processes)."""

    name: str
    run: Callable[[StoreExercise], Awaitable[None]]
    needs_url: bool
    doc: str


STORE_CHECKS: list[StoreCheck] = []


def store_check(
    *, needs_url: bool = False
) -> Callable[[Callable[[StoreExercise], Awaitable[None]]], StoreCheck]:
    """Register a check; its name is the function's without a ``check_`` prefix."""

    def register(run: Callable[[StoreExercise], Awaitable[None]]) -> StoreCheck:
        name = run.__name__.removeprefix("check_")
        found = StoreCheck(name, run, needs_url, run.__doc__ or "")
        if any(c.name == name for c in STORE_CHECKS):
            raise ValueError(f"two store conformance checks named {name!r}")
        STORE_CHECKS.append(found)
        return found

    return register


class StoreExercise:
    """One check's view of the case: fresh names, and calls that let time pass."""

    def __init__(self, case: StoreCase) -> None:
        self.case = case
        self.store = case.store
        self.ttl = case.ttl
        self.slack = case.slack
        self.clock = case.clock
        self.url = case.url
        self._tag = uuid.uuid4().hex[:12]

    def name(self, what: str = "k") -> str:
        """A key, id or name no other check (or run against the same server) uses."""
        return f"{what}-{self._tag}-{uuid.uuid4().hex[:8]}"

    def now(self) -> float:
        """Epoch seconds on the store's clock (the fake one's, if any)."""
        return self.clock.time() if self.clock else time.time()

    async def elapse(self, seconds: float, *, sleepers: int = 0) -> None:
        """Let ``seconds`` pass on the store's clock; on a fake clock, first wait until
        ``sleepers`` tasks sleep on it (a wait under test has set its timer)."""
        if self.clock is None:
            await asyncio.sleep(seconds)
            return
        if sleepers:
            await self.clock.wait_for_sleepers(sleepers)
        await self.clock.advance(seconds)

    async def lapse(self) -> None:
        """Let a ``ttl`` (and its slack) pass."""
        await self.elapse(self.ttl + self.slack)

    def record(self, job_id: str, status: str = "queued", **fields: object) -> JobRecord:
        """A job record as an enqueue writes it."""
        values: dict[str, object] = {"attempt": 1, "enqueued_at": 1_700_000_000.25}
        values |= fields
        return JobRecord(job_id, "send_email", "emails", status, **values)  # type: ignore[arg-type]

    async def started(self, job_id: str) -> None:
        """Give a task started just before this a chance to begin its wait."""
        for _ in range(5):
            await asyncio.sleep(0.01 if self.clock is None else 0)
