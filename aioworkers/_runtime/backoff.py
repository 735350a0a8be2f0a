"""The one way a broker or store call is retried: capped, jittered exponential pauses on an
injected clock."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import BrokerUnavailable
from ..idempotency.base import StoreUnavailable
from .clock import Clock

log = logging.getLogger("aioworkers")

T = TypeVar("T")

# A broker or store that is down (transient by contract): worth another try.
RETRY_ON: tuple[type[BaseException], ...] = (BrokerUnavailable, StoreUnavailable)


class Backoff:
    """Pauses of ``first``, twice that, ... up to ``cap`` seconds, each drawn from its upper
    half ("equal jitter"), so callers that failed together do not retry in lockstep and no
    pause is near zero. For loops that do more between tries than one call (the fetcher);
    one call is retried with `backoff`."""

    __slots__ = ("_cap", "_clock", "_first", "_next", "_rand")

    def __init__(
        self,
        clock: Clock,
        *,
        first: float = 0.05,
        cap: float = 5.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self._first = first
        self._cap = cap
        self._rand = rand
        self._next = first

    def delay(self) -> float:
        """The next pause, in seconds (each call doubles the one after, up to the cap)."""
        ceiling = self._next
        self._next = min(ceiling * 2, self._cap)
        return ceiling * (0.5 + self._rand() / 2)

    async def pause(self, delay: float | None = None) -> None:
        """Sleep ``delay`` (default: the next pause) on the clock."""
        await self._clock.sleep(self.delay() if delay is None else delay)

    def reset(self) -> None:
        """The call worked: the next failure pauses ``first`` again."""
        self._next = self._first


async def backoff(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    clock: Clock,
    deadline: float | None = None,
    retry_on: tuple[type[BaseException], ...] = RETRY_ON,
    first: float = 0.05,
    cap: float = 5.0,
) -> T:
    """Await ``call()`` until it returns, retrying on ``retry_on`` after a `Backoff` pause.

    Without ``deadline`` it retries forever: callers bound it with a cancel scope (shutdown
    cancels it). With one (on ``clock.monotonic()``), the error is raised once the next
    pause would end past it.
    """
    pauses = Backoff(clock, first=first, cap=cap)
    while True:
        try:
            return await call()
        except retry_on as exc:
            delay = pauses.delay()
            if deadline is not None and clock.monotonic() + delay > deadline:
                raise
            log.warning("%s failed, retrying in %.2fs: %s", what, delay, exc)
            await pauses.pause(delay)
