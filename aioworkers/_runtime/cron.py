"""The scheduler loop of periodic jobs: every worker runs one; the store decides who fires.

For each due slot of each schedule, every worker calls ``store.claim_slot(name, slot)``
once; the one that gets True enqueues the job (the others are done: one store round trip
each). The claim is kept ``catchup + LATE + 1 h`` after the slot, longer than any worker
would still try that slot, so a job that ends fast never lets a second worker fire it.

What the store keeps per schedule, as job records (so every backend holds them):

- ``aioworkers-schedule:<name>``: the last slot decided (its outcome, job id, and the
  fingerprint of the schedule that decided it), for ``aioworkers schedules``, catch-up
  after a restart, and the check that all processes agree on the schedule;
- ``aioworkers-schedule-run:<name>`` (``overlap="skip"`` only): the run in progress,
  ``queued`` from enqueue until the handler succeeds or fails for good.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
import orjson

from ..envelope import now_ms
from ..errors import BrokerUnavailable
from ..periodic import MAX_CATCHUP, RUN, SCHEDULE_HEADER, SLOT_HEADER, Schedule
from ..store.base import JobRecord, Store, StoreUnavailable
from ..task import Call
from .backoff import backoff
from .clock import Clock

log = logging.getLogger("aioworkers.periodic")

Outcome = Literal["fired", "skipped", "missed"]
STATE = "aioworkers-schedule:"
# A running loop still fires a slot it wakes up this late (a busy event loop, a stall);
# later than this (and than catchup) the slot counts as missed.
LATE = 60.0
_STATE_TTL = 30 * 86400.0
_FAILURES = (StoreUnavailable, BrokerUnavailable, OSError, TimeoutError)

Enqueue = Callable[[Call], Awaitable[Any]]


def claim_ttl(schedule: Schedule) -> float:
    """How long a slot's claim is kept: past the last moment any worker tries the slot,
    with an hour for clocks that disagree."""
    return max(schedule.catchup, LATE) + 3600.0


def run_ttl(schedule: Schedule) -> float:
    """How long an ``overlap="skip"`` run blocks its schedule if its end is never seen
    (dead-lettered before it ran, or lost)."""
    return max(3600.0, 3 * schedule.period)


def slot_text(slot: float) -> str:
    return str(round(slot * 1000))


class Periodic:
    """Fires ``schedules`` from one worker: `run` until cancelled."""

    def __init__(
        self, schedules: list[Schedule], store: Store, enqueue: Enqueue, clock: Clock
    ) -> None:
        self.schedules = schedules
        self.store = store
        self.enqueue = enqueue
        self.clock = clock
        self.counts: Counter[tuple[str, Outcome]] = Counter()
        self._recorded: set[str] = set()  # schedules this process wrote the state of
        self._meter: Any = None

    def __repr__(self) -> str:
        return f"<Periodic schedules={len(self.schedules)}>"

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for schedule in self.schedules:
                tg.start_soon(self._loop, schedule)

    async def _loop(self, schedule: Schedule) -> None:
        window = max(schedule.catchup, LATE)
        slot = await self._catch_up(schedule)
        while slot is not None:
            # In steps: a long sleep on the monotonic clock drifts from the wall clock.
            while (wait := slot - self.clock.time()) > 0:
                await self.clock.sleep(min(wait, 300.0))
            if self.clock.time() - slot > window:
                self._count(schedule, "missed", slot)
            else:
                await self._decide(schedule, slot)
            # Behind by more than the window (a long stall): those slots are counted.
            behind = self.clock.time() - window
            slot = schedule.next_slot(slot)
            if slot is not None and slot < behind:
                missed = schedule.count_slots(slot - 1e-3, behind)
                self._count(schedule, "missed", None, missed)
                slot = schedule.next_slot(behind)

    async def _catch_up(self, schedule: Schedule) -> float | None:
        """Fire the slots missed within ``catchup`` since the last slot recorded (oldest
        first, at most `MAX_CATCHUP`), count older ones as missed; the next slot to wait for.
        A schedule never fired before has missed nothing."""
        now = self.clock.time()
        try:
            state = await self.read_state(schedule)
        except _FAILURES as exc:
            log.warning("schedule %r: could not read its last slot: %s", schedule.name, exc)
            state = None
        last = state.get("slot") if state else None
        if not isinstance(last, int):
            return schedule.next_slot(now)  # never fired: nothing was missed
        start = now - schedule.catchup
        if last / 1000 < start:
            missed = schedule.count_slots(last / 1000, start)
            if missed:
                self._count(schedule, "missed", None, missed)
        if schedule.catchup > 0:
            begin = max(start, last / 1000)
            slots, dropped = schedule.slots_between(begin, now, MAX_CATCHUP)
            if dropped:
                self._count(schedule, "missed", None, dropped)
            for slot in slots:
                await self._decide(schedule, slot)
        return schedule.next_slot(now)

    async def _decide(self, schedule: Schedule, slot: float) -> None:
        """Claim the slot; if this worker won it, fire (or skip) it and record that."""
        try:
            if not await self.store.claim_slot(
                schedule.name, slot_text(slot), ttl=claim_ttl(schedule)
            ):
                return
            state = await self.read_state(schedule)
            self._check_fingerprint(schedule, state)
            outcome: Outcome = "fired"
            job_id = None
            if schedule.overlap == "skip" and await self._running(schedule):
                outcome = "skipped"
            else:
                job_id = await self._fire(schedule, slot)
            await self._record(schedule, slot, outcome, job_id)
            self._count(schedule, outcome, slot, job_id=job_id)
        except _FAILURES as exc:
            # Another worker may have fired it; if none could, the slot is lost.
            log.warning(
                "schedule %r: slot %s not decided: %s: %s",
                schedule.name,
                _iso(slot),
                type(exc).__name__,
                exc,
            )
        except Exception:
            # A job that cannot be enqueued (too large, a broker's ConfigError) must not
            # stop the worker's other work: each slot says so again.
            log.exception("schedule %r: slot %s failed", schedule.name, _iso(slot))

    async def _fire(self, schedule: Schedule, slot: float) -> str:
        if schedule.overlap == "skip":
            record = JobRecord(
                id=RUN + schedule.name,
                task=schedule.task,
                queue=schedule.queue or "",
                status="queued",
                enqueued_at=self.clock.time(),
            )
            await self.store.put_job(record, ttl=run_ttl(schedule))
        headers = {SCHEDULE_HEADER: schedule.name, SLOT_HEADER: slot_text(slot)}
        call = Call(
            schedule.task,
            schedule.args,
            dict(schedule.kwargs),
            queue=schedule.queue,
            headers=headers,
        )
        # The slot is ours alone now: a broker outage is waited out (within the window
        # a late slot may still fire in), or the slot is lost.
        deadline = self.clock.monotonic() + min(max(schedule.catchup, LATE), 30.0)
        sent = await backoff(
            functools.partial(self.enqueue, call),
            what=f"enqueueing schedule {schedule.name!r}",
            clock=self.clock,
            deadline=deadline,
        )
        return sent if isinstance(sent, str) else str(sent.id)

    async def _running(self, schedule: Schedule) -> bool:
        record = await self.store.get_job(RUN + schedule.name)
        return record is not None and not record.final

    async def read_state(self, schedule: Schedule) -> dict[str, Any] | None:
        """The last slot decided (``slot`` epoch ms, ``outcome``, ``job``, ...), or None."""
        record = await self.store.get_job(STATE + schedule.name)
        if record is None or record.result is None:
            return None
        try:
            state = orjson.loads(record.result)
        except orjson.JSONDecodeError:
            return None
        return state if isinstance(state, dict) else None

    async def _record(
        self, schedule: Schedule, slot: float, outcome: Outcome, job_id: str | None
    ) -> None:
        state = {
            "slot": round(slot * 1000),
            "outcome": outcome,
            "job": job_id,
            "fingerprint": schedule.fingerprint,
            "expression": schedule.expression,
            "at": now_ms(),
        }
        record = JobRecord(
            id=STATE + schedule.name,
            task=schedule.task,
            queue=schedule.queue or "",
            status="succeeded",
            result=orjson.dumps(state),
        )
        await self.store.put_job(record, ttl=max(_STATE_TTL, 3 * schedule.period))
        self._recorded.add(schedule.name)

    def _check_fingerprint(self, schedule: Schedule, state: dict[str, Any] | None) -> None:
        theirs = state.get("fingerprint") if state else None
        if theirs is None or theirs == schedule.fingerprint:
            return
        assert state is not None
        if schedule.name in self._recorded:
            # We wrote ours, and another process wrote its own since: two schedules live.
            log.error(
                "schedule %r is registered differently by another process of this app "
                "(%s there, %s here): each fires the slots it computes; deploy one "
                "definition, or give them different names",
                schedule.name,
                state.get("expression"),
                schedule.expression,
            )
        else:
            log.info(
                "schedule %r changed: %s before, %s now",
                schedule.name,
                state.get("expression"),
                schedule.expression,
            )

    def _count(
        self,
        schedule: Schedule,
        outcome: Outcome,
        slot: float | None,
        n: int = 1,
        job_id: str | None = None,
    ) -> None:
        self.counts[(schedule.name, outcome)] += n
        meter = self._counter()
        if meter is not None:
            meter.add(n, {"aioworkers.schedule": schedule.name, "outcome": outcome})
        when = _iso(slot) if slot is not None else f"{n} slot(s)"
        if outcome == "fired":
            log.info("schedule %r fired slot %s: job %s", schedule.name, when, job_id)
        elif outcome == "skipped":
            log.info(
                "schedule %r skipped slot %s: its previous run has not ended (overlap='skip')",
                schedule.name,
                when,
            )
        else:
            log.warning("schedule %r missed %s (no worker was up to fire it)", schedule.name, when)

    def _counter(self) -> Any:
        if self._meter is None:
            from ..telemetry.config import real_meter_provider

            provider = real_meter_provider(None)
            self._meter = False
            if provider is not None:
                self._meter = provider.get_meter("aioworkers").create_counter(
                    "aioworkers.schedule.slots",
                    unit="{slot}",
                    description="Slots of periodic schedules, by outcome (fired, skipped, missed)",
                )
        return self._meter or None


def _iso(slot: float | None) -> str:
    from datetime import UTC, datetime

    if slot is None or not math.isfinite(slot):
        return "?"
    return datetime.fromtimestamp(slot, UTC).isoformat()


def periodic_for(app: Any, clock: Clock) -> Periodic:
    """The scheduler loop of ``app``'s schedules (what `App.worker` gives its worker)."""

    async def enqueue(call: Call) -> Any:
        (sent,) = await app.enqueue_many([call])
        return sent

    return Periodic(list(app.schedules.values()), app.store, enqueue, clock)
