"""Waiting for a job to end, the same way on every store: read the record, and if it has
not ended, wait for a wake-up (or a while) and read again. A store that is unavailable
meanwhile is retried inside the wait; only the timeout ends it."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable

from .._runtime.clock import SYSTEM_CLOCK, Clock, move_on_after
from .base import JobRecord, StoreUnavailable

log = logging.getLogger("aioworkers")

# Pauses after a failed read: from FIRST_PAUSE, doubling, at most MAX_PAUSE seconds.
FIRST_PAUSE = 0.05
MAX_PAUSE = 1.0


async def wait_final(
    job_id: str,
    read: Callable[[], Awaitable[JobRecord | None]],
    wake: Callable[[float], Awaitable[None]],
    *,
    timeout: float | None,  # noqa: ASYNC109 (a store error inside is retried, not raised)
    step: float,
    clock: Clock = SYSTEM_CLOCK,
) -> JobRecord | None:
    """The record once final, or None once there is none; `TimeoutError` after ``timeout``
    seconds. ``wake(seconds)`` returns when the job may have ended, or after ``seconds``
    (at most ``step``): a missed wake-up costs one ``step``, never the answer."""
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout}")
    deadline = math.inf if timeout is None else clock.monotonic() + timeout
    pause = FIRST_PAUSE
    last: StoreUnavailable | None = None
    while True:
        try:
            record = await read()
            if record is None or record.final:
                return record
            left = deadline - clock.monotonic()
            if left <= 0:
                break
            await wake(min(left, step))
            pause = FIRST_PAUSE
        except StoreUnavailable as exc:
            if last is None:
                log.warning("waiting for job %s: store unavailable, retrying: %s", job_id, exc)
            last = exc
            left = deadline - clock.monotonic()
            if left <= 0:
                break
            await clock.sleep(min(pause, left))
            pause = min(pause * 2, MAX_PAUSE)
    raise TimeoutError(f"job {job_id} did not end within {timeout:g} s") from last


class Waiters:
    """In-process wake-ups by job id: `wait` until `wake` or ``seconds`` of ``clock``."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._futures: dict[str, set[asyncio.Future[None]]] = {}

    async def wait(self, job_id: str, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        futures = self._futures.setdefault(job_id, set())
        futures.add(future)
        try:
            if self._clock is SYSTEM_CLOCK:
                await asyncio.wait([future], timeout=seconds)
            else:
                with move_on_after(self._clock, seconds):
                    await future
        finally:
            futures.discard(future)
            if not futures and self._futures.get(job_id) is futures:
                del self._futures[job_id]

    def wake(self, job_id: str) -> None:
        for future in self._futures.pop(job_id, ()):
            if not future.done():
                future.set_result(None)
