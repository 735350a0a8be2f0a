"""Periodic jobs: `Schedule` (a cron expression or an interval, in a time zone) and
`register`, what ``@app.periodic(...)`` calls.

A schedule's *slots* are the epoch seconds it fires at. ``every=N`` slots are the
multiples of N seconds since the epoch (so every worker computes the same ones, whatever
its start time); ``cron=`` slots are the matching local times of ``tz``: a local time
that does not exist (a spring-forward gap) is skipped, one that happens twice (fall back)
fires once, at its first occurrence. Cron is parsed by ``cronsim``.

The scheduler loop that fires them lives in `aioworkers._runtime.cron`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .envelope import now_ms
from .errors import ConfigError, Reject
from .job import running_job
from .store.base import JobFinish, StoreUnavailable

if TYPE_CHECKING:
    from .task import Task

log = logging.getLogger("aioworkers.periodic")

Overlap = Literal["allow", "skip"]
# Headers of a job enqueued by a schedule (envelope headers: older workers ignore them).
SCHEDULE_HEADER = "aioworkers-schedule"
SLOT_HEADER = "aioworkers-scheduled-for"  # epoch milliseconds, as a decimal string
# The store's record of an overlap="skip" schedule's run in progress (see _runtime/cron.py).
RUN = "aioworkers-schedule-run:"
# At most this many missed slots fire on catch-up (the newest); the rest count as missed.
MAX_CATCHUP = 100
# A cron expression that matches nothing for this long is refused (e.g. "0 0 30 2 *").
_HORIZON = timedelta(days=366 * 5)


@dataclass(frozen=True, slots=True)
class Schedule:
    """One registered schedule: when (``cron`` in ``tz``, or ``every`` seconds), what
    (``task`` with ``args``/``kwargs`` on ``queue``), and its policies."""

    name: str
    task: str
    cron: str | None = None
    every: float | None = None
    tz: str = "UTC"
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    overlap: Overlap = "allow"
    catchup: float = 0.0

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise ConfigError(f"schedule {self.name!r}: give exactly one of cron= and every=")
        if self.every is not None and not (math.isfinite(self.every) and self.every > 0):
            raise ConfigError(f"schedule {self.name!r}: every must be > 0 seconds")
        if self.overlap not in ("allow", "skip"):
            raise ConfigError(f"schedule {self.name!r}: overlap must be 'allow' or 'skip'")
        if not (math.isfinite(self.catchup) and self.catchup >= 0):
            raise ConfigError(f"schedule {self.name!r}: catchup must be >= 0 seconds")
        self.zone  # noqa: B018 (checks the time zone now, not at the first slot)
        if self.cron is not None:
            if len(self.cron.split()) not in (5, 6):
                raise ConfigError(
                    f"schedule {self.name!r}: cron needs 5 fields (or 6, seconds first): "
                    f"{self.cron!r}"
                )
            if self.next_slot(0.0) is None:
                raise ConfigError(f"schedule {self.name!r}: {self.cron!r} never fires")

    @property
    def expression(self) -> str:
        """What the schedule says, for logs and ``aioworkers schedules``."""
        return f"cron {self.cron}" if self.cron is not None else f"every {self.every:g}s"

    @property
    def fingerprint(self) -> str:
        """A short hash of when and what the schedule fires: two processes that disagree
        on it run two different schedules under one name."""
        what = repr((self.cron, self.every, self.tz, self.task, self.args, self.kwargs))
        return hashlib.blake2b(what.encode(), digest_size=6).hexdigest()

    @property
    def zone(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"schedule {self.name!r}: unknown time zone {self.tz!r}") from exc

    @property
    def period(self) -> float:
        """About how far apart slots are (exact for ``every``; one sample for cron)."""
        if self.every is not None:
            return self.every
        first = self.next_slot(0.0)
        second = None if first is None else self.next_slot(first)
        return 60.0 if first is None or second is None else second - first

    def next_slot(self, after: float) -> float | None:
        """The first slot strictly after ``after`` (epoch seconds); None: never again."""
        if self.every is not None:
            return (math.floor(after / self.every) + 1) * self.every
        assert self.cron is not None
        return _next_cron(self.cron, self.zone, after)

    def slots_between(self, start: float, end: float, limit: int) -> tuple[list[float], int]:
        """The slots in ``(start, end]``: the newest ``limit`` of them, oldest first, and
        how many older ones were left out."""
        total = self.count_slots(start, end)
        if self.every is not None and total > limit:
            start = (math.floor(end / self.every) - limit) * self.every
        found: deque[float] = deque(maxlen=limit)
        slot = self.next_slot(start)
        while slot is not None and slot <= end:
            found.append(slot)
            slot = self.next_slot(slot)
        return list(found), max(0, total - limit)

    def count_slots(self, start: float, end: float, cap: int = 100_000) -> int:
        """How many slots are in ``(start, end]`` (counted up to ``cap``)."""
        if self.every is not None:
            first = math.floor(start / self.every) + 1
            return max(0, min(cap, math.floor(end / self.every) - first + 1))
        n = 0
        slot = self.next_slot(start)
        while slot is not None and slot <= end and n < cap:
            n += 1
            slot = self.next_slot(slot)
        return n


def _next_cron(expr: str, zone: ZoneInfo, after: float) -> float | None:
    from cronsim import CronSim, CronSimError

    local = datetime.fromtimestamp(after, zone).replace(tzinfo=None, microsecond=0)
    # Naive local times, strictly after ``local``: in the second pass of a repeated hour
    # they map (fold=0) to times before ``after``, and are passed over below.
    try:
        times = CronSim(expr, local)
    except CronSimError as exc:
        raise ConfigError(f"bad cron expression {expr!r}: {exc}") from None
    horizon = local + _HORIZON
    for naive in times:
        if naive > horizon:
            return None
        aware = naive.replace(tzinfo=zone)  # fold=0: the first of a repeated time
        back = aware.astimezone(UTC).astimezone(zone).replace(tzinfo=None)
        if back != naive:
            continue  # in a spring-forward gap: this local time does not exist
        slot = aware.timestamp()
        if slot > after:
            return slot
    return None


def register(
    app: Any,
    target: Task[Any, Any],
    *,
    cron: str | None,
    every: float | None,
    name: str | None,
    tz: str,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None,
    queue: str | None,
    overlap: Overlap,
    catchup: float,
) -> Schedule:
    """Add a schedule for ``target`` to ``app.schedules`` (`App.periodic` does this)."""
    schedule = Schedule(
        name=name or target.name,
        task=target.name,
        cron=cron,
        every=every,
        tz=tz,
        args=tuple(args),
        kwargs=dict(kwargs or {}),
        queue=queue,
        overlap=overlap,
        catchup=float(catchup),
    )
    if schedule.name in app.schedules:
        raise ConfigError(f"a schedule named {schedule.name!r} is already registered")
    target.check_arguments(schedule.args, schedule.kwargs)
    if overlap == "skip":
        finish_runs(app, target)
    app.schedules[schedule.name] = schedule
    return schedule


def decorator(
    app: Any, options: dict[str, Any], task_options: dict[str, Any]
) -> Callable[..., Any]:
    """What ``@app.periodic(...)`` returns: registers a function as a task (with
    ``task_options``) or takes a `Task` as it is, then schedules it."""

    def schedule(fn: Callable[..., Coroutine[Any, Any, Any]] | Task[Any, Any]) -> Any:
        from .task import Task

        target = fn if isinstance(fn, Task) else app.task(**task_options)(fn)
        register(app, target, **options)
        return target

    return schedule


def finish_runs(app: Any, task: Task[Any, Any]) -> None:
    """Wrap ``task``'s handler so that a job fired by an ``overlap="skip"`` schedule ends
    its run record when it ends for good (success, `Reject`, or its last attempt failing)."""
    fn = task.fn
    retries = task.policy.retries

    async def run(*args: Any, **kwargs: Any) -> Any:
        job = running_job()
        name = None if job is None else job.headers.get(SCHEDULE_HEADER)
        if job is None or name is None:
            return await fn(*args, **kwargs)
        try:
            result = await fn(*args, **kwargs)
        except Reject:
            await _end_run(app, name, "failed")
            raise
        except Exception:
            if job.attempt > retries:
                await _end_run(app, name, "failed")
            raise
        await _end_run(app, name, "succeeded")
        return result

    functools.update_wrapper(run, fn)
    task.fn = run


async def _end_run(app: Any, name: str, status: Literal["succeeded", "failed"]) -> None:
    end = JobFinish(id=RUN + name, status=status, ttl=3600.0, finished_at=now_ms() / 1000)
    try:
        await app.store.finish_jobs([end])
    except (StoreUnavailable, OSError, TimeoutError) as exc:
        log.warning("schedule %r: could not end its run record (%s): it lapses", name, exc)
