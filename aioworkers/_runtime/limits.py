"""Flow control across every worker: concurrency slots (leases in the state store) and
rate limits (token buckets in it), per task or per value of one argument; the pause a
`RateLimited` from a handler puts on a rate-limited key.

A job that cannot start now is *throttled*: handed back through the broker's delay with
its body unchanged (no attempt used, no slot held), to come back when a slot or a token is
likely free. A task without limits never reaches this module (``task.limits is None``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..envelope import Envelope
from ..errors import ConfigError, RateLimited
from ..store.base import Store, StoreUnavailable
from .clock import Clock
from .inflight import Run
from .outcome import RELEASE, Outcome, TaskInfo, Throttle
from .policy import defer

log = logging.getLogger("aioworkers")

_RATE = re.compile(r"\s*([1-9][0-9]*)\s*/\s*([smh])\s*")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}
# A throttled job comes back after at most this long (then asks again).
MAX_THROTTLE = 30.0
# Before a task has run here, a job waiting for a slot asks again after about this long.
FIRST_GUESS = 1.0
# Keys whose waiters this process counts (for spreading comebacks); past it, forgotten.
MAX_TRACKED = 10_000
# Waiting jobs of one key this process keeps count of (past it, the oldest are dropped).
MAX_LINE = 10_000
# A rate token due within this long is waited for in place (a throttle through the broker
# costs more than that), and a throttled job comes back this much before its turn: a job
# late for its turn leaves that token unused, a spacing of the rate lost for good.
NEAR = 0.1
NEAR_TRIES = 3
EARLY = 0.06


def parse_rate(text: str) -> tuple[int, float]:
    """``"5/s"`` -> ``(5, 1.0)``; ``"N/s"``, ``"N/m"`` or ``"N/h"``, N >= 1."""
    match = _RATE.fullmatch(text)
    if match is None:
        raise ConfigError(f'rate_limit must be "N/s", "N/m" or "N/h" (N >= 1), got {text!r}')
    return int(match[1]), _PER[match[2]]


@dataclass(frozen=True, slots=True)
class Limits:
    """A task's limits: at most ``concurrency`` attempts running at once, at most ``rate``
    starts per ``per`` seconds (evenly spaced: one every ``per / rate`` s), both per value
    of the argument ``key`` if given (else per task)."""

    task: str
    concurrency: int | None
    rate: int | None
    per: float
    key: str | None
    _index: int | None = field(default=None, compare=False)
    _default: Any = field(default=inspect.Parameter.empty, compare=False)

    @classmethod
    def build(
        cls,
        task: str,
        signature: inspect.Signature,
        *,
        concurrency: int | None,
        rate_limit: str | None,
        limit_key: str | None,
    ) -> Limits | None:
        """The limits of a task being registered (None: it has none); a `ConfigError`
        for a bad one."""
        if concurrency is None and rate_limit is None:
            if limit_key is not None:
                raise ConfigError("limit_key needs concurrency= or rate_limit=")
            return None
        if concurrency is not None and concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        rate, per = parse_rate(rate_limit) if rate_limit is not None else (None, 1.0)
        index, default = None, inspect.Parameter.empty
        if limit_key is not None:
            param = signature.parameters.get(limit_key)
            if param is None or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise ConfigError(f"limit_key {limit_key!r} is not a parameter of task {task!r}")
            if param.kind is not param.KEYWORD_ONLY:
                index = list(signature.parameters).index(limit_key)
            default = param.default
        return cls(task, concurrency, rate, per, limit_key, index, default)

    def name_for(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """The store key of a job's limits: the task, or the task and its key value."""
        if self.key is None:
            return self.task
        if self.key in kwargs:
            value = kwargs[self.key]
        elif self._index is not None and self._index < len(args):
            value = args[self._index]
        else:
            value = self._default
        return f"{self.task}[{value}]"


@dataclass(slots=True)
class _Waiting:
    """What this process saw of one key lately: the jobs waiting on it, and how long its
    runs take (an average), to spread the comebacks of jobs waiting on it."""

    # Job id -> when it was last throttled here, oldest first: the line of waiters. Jobs,
    # not throttles, are counted: one job throttled again and again is a line of one.
    line: dict[str, float] = field(default_factory=dict)
    duration: float | None = None
    paused_until: float = 0.0
    next_turn: float = 0.0  # when the next job throttled by a rate here should ask again
    in_place: bool = False  # a job of this key waits here for a token due within moments


class Limiter:
    """Applies `Limits` when a job starts: one store call for a concurrency slot or a rate
    token (a task with both: a slot, then a token), and for a rate limit a read of its
    pause mark made at the same time."""

    def __init__(
        self,
        store: Store | None,
        *,
        lease: float,
        clock: Clock,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._lease = lease
        self._clock = clock
        self._rand = rand
        self._seen: dict[str, _Waiting] = {}

    def _waiting(self, name: str) -> _Waiting:
        seen = self._seen.get(name)
        if seen is None:
            if len(self._seen) >= MAX_TRACKED:
                self._seen.clear()
            seen = self._seen[name] = _Waiting()
        return seen

    async def run(
        self,
        limits: Limits,
        env: Envelope,
        task: TaskInfo,
        run: Run,
        body: Callable[[], Awaitable[Outcome]],
    ) -> Outcome:
        """Run ``body`` (the job) if its limits let it start now, else throttle it."""
        store = self._store
        if store is None:
            raise RuntimeError(f"task {limits.task!r} has limits but the worker has no store")
        name = limits.name_for(env.args, env.kwargs)
        slot = (name, secrets.token_hex(8)) if limits.concurrency is not None else None
        seen = self._waiting(name)
        try:
            with run.catch_cancel():
                wait = await self._admit(store, limits, name, slot)
                if wait is not None and 0 < wait <= NEAR and not seen.in_place:
                    wait = await self._wait_in_place(store, limits, name, slot, seen, wait)
        except StoreUnavailable as exc:
            # Fail closed: without the store nothing says a slot or a token is free.
            return Outcome(env, task, defer(self._lease), detail=f"state store unavailable: {exc}")
        if run.cancel_taken:
            if slot is not None:
                await self._release(store, slot)  # it may have been taken before the cancel
            return Outcome(env, task, RELEASE)
        if wait is not None:
            delay = self._comeback(limits, seen, wait, env.id)
            return Outcome(env, task, Throttle(delay), detail=f"limit of {name!r} reached")
        if seen.line:
            seen.line.pop(env.id, None)
        run.slot = slot
        try:
            outcome = await body()
        finally:
            # Dropped before the store hears of it: a beat crossing the release then
            # reports a lease this run no longer holds, which cancels nothing.
            run.slot = None
            if slot is not None:
                await self._release(store, slot)
        self._learn(seen, outcome.duration)
        if limits.rate is not None and isinstance(outcome.error, RateLimited):
            await self._pause(store, limits, name, seen, outcome.error.retry_after)
        return outcome

    async def _wait_in_place(
        self,
        store: Store,
        limits: Limits,
        name: str,
        slot: tuple[str, str] | None,
        seen: _Waiting,
        wait: float,
    ) -> float | None:
        """Wait here for a token due within moments, one job of a key at a time (the
        others take turns through the broker); a job of another worker may still take it
        first. Returns what the last `_admit` said."""
        seen.in_place = True
        try:
            for _ in range(NEAR_TRIES):
                await self._clock.sleep(wait)
                got = await self._admit(store, limits, name, slot)
                if got is None or not 0 < got <= NEAR:
                    return got
                wait = got
            return wait
        finally:
            seen.in_place = False

    async def _admit(
        self, store: Store, limits: Limits, name: str, slot: tuple[str, str] | None
    ) -> float | None:
        """Take a slot and a token: None if the job may start, else how long until a
        token (0 for a slot: unknown)."""
        if slot is not None:
            assert limits.concurrency is not None
            if not await store.acquire_lease(*slot, limit=limits.concurrency, lease=self._lease):
                return 0.0
        if limits.rate is None:
            return None
        try:
            wait = await self._take(store, limits, name)
        except BaseException:
            if slot is not None:
                await self._release(store, slot)
            raise
        if wait is not None and slot is not None:
            await self._release(store, slot)
        return wait

    async def _take(self, store: Store, limits: Limits, name: str) -> float | None:
        assert limits.rate is not None
        seen = self._seen.get(name)
        now = self._clock.time()
        if seen is not None and seen.paused_until > now:
            return seen.paused_until - now  # paused from here: no need to ask
        # A bucket of one token refilled every per / rate seconds: starts are spaced
        # evenly, so any window of ``per`` seconds holds at most ``rate`` of them.
        spacing = limits.per / limits.rate
        # The pause mark is read at the same time: two calls, one round trip of waiting.
        wait, paused = await asyncio.gather(
            store.take(f"rate:{name}", rate=1, per=spacing),
            store.cancelled([_pause_id(name)]),
        )
        if paused:
            return max(wait, spacing)  # asks again; a token taken meanwhile is not missed
        return wait if wait > 0 else None

    def _comeback(self, limits: Limits, seen: _Waiting, wait: float, job_id: str) -> float:
        """When a throttled job should ask again: when a token is due (rate), or after
        about one run of the task (slot), spread over how many wait with it here."""
        if wait > 0 and limits.rate:
            # Each waiter gets a turn of its own, one token's spacing after the one before:
            # all coming back when the next token is due would start one and throttle the
            # rest again, a round trip each, at every token.
            spacing = limits.per / limits.rate
            now = self._clock.time()
            turn = max(min(seen.next_turn, now + MAX_THROTTLE), now + wait)
            seen.next_turn = turn + spacing
            early = min(EARLY, spacing * 0.5)  # before its turn, after the previous one's
            jitter = early * 0.25 * self._rand()
            return min(MAX_THROTTLE, max(turn - now - early, 0.0) + jitter)
        if wait > 0:
            step = wait
        else:
            step = seen.duration if seen.duration is not None else FIRST_GUESS
            if limits.concurrency is not None:
                step /= limits.concurrency
        # Jittered over a span as long as the line of jobs this process saw waiting, so
        # they do not all come back at the moment one slot frees; a lone job comes back
        # within one and a half steps each time, however often it is throttled.
        waiters = self._line(seen, job_id, step)
        spread = step * waiters * self._rand()
        return min(MAX_THROTTLE, wait + max(step, 0.01) * 0.5 + spread)

    def _line(self, seen: _Waiting, job_id: str, step: float) -> int:
        """Put ``job_id`` at the back of the line of ``seen``; how many wait in it."""
        now = self._clock.time()
        line = seen.line
        line.pop(job_id, None)
        # A waiter not throttled again within its longest comeback (about a step per
        # waiter, and one more) started in another process, or is gone.
        stale = now - step * (len(line) + 2)
        while line:
            oldest = next(iter(line))
            if line[oldest] >= stale and len(line) < MAX_LINE:
                break
            del line[oldest]
        line[job_id] = now
        return len(line)

    def _learn(self, seen: _Waiting, duration: float) -> None:
        if seen.duration is None:
            seen.duration = duration
        else:
            seen.duration += (duration - seen.duration) * 0.2

    async def _pause(
        self, store: Store, limits: Limits, name: str, seen: _Waiting, seconds: float
    ) -> None:
        """Pause ``name`` for every worker for ``seconds``: a mark in the store that each
        rate-limited start reads (and this process remembers)."""
        if seconds <= 0:
            return
        seen.paused_until = max(seen.paused_until, self._clock.time() + seconds)
        try:
            await store.mark_cancelled(_pause_id(name), ttl=seconds)
        except StoreUnavailable as exc:
            log.warning("could not pause %r for every worker (this one pauses it): %s", name, exc)

    async def _release(self, store: Store, slot: tuple[str, str]) -> None:
        try:
            await store.release_lease(*slot)
        except StoreUnavailable as exc:
            log.warning(
                "could not release a slot of %r; it lapses with its lease: %s", slot[0], exc
            )


def _pause_id(name: str) -> str:
    # A cancel mark under an id no job has (job ids are hex): read in the same call shape.
    return f"pause:{name}"


class Limited(Protocol):
    """A registered task, as far as limits go."""

    @property
    def name(self) -> str: ...

    @property
    def limits(self) -> Limits | None: ...


def check_store(tasks: Iterable[Limited], store: object) -> Store | None:
    """The store limits run on: a `ConfigError` if a task has limits and there is none."""
    if isinstance(store, Store):
        return store
    limited = [t.name for t in tasks if t.limits is not None]
    if limited:
        raise ConfigError(
            f"tasks {limited} have concurrency or rate limits, which need a state store "
            "(store= on the App, or AIOWORKERS_STORE_URL)"
        )
    return None
