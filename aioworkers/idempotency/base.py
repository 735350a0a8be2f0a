"""The idempotency store protocol: one record per key, claimed while a job runs, done after.

A key is *claimed* by one run (its ``owner`` token) for a ``lease`` of seconds, extended
by the worker's heartbeat; a claim that is not extended lapses, so a crashed worker's key
frees itself. A key *done* is remembered for ``ttl`` seconds: a job with that key is
acknowledged without running. Every operation is atomic, and only the owner of a claim
may extend, complete or release it, so a worker that stalled past its lease never commits
over the run that took the key after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from ..errors import AioworkersError

ClaimResult = Literal["claimed", "done", "busy"]


class StoreUnavailable(AioworkersError):
    """A transient store failure (connection lost, timeout): the runtime fails closed, runs
    nothing under the key and tries the job again later."""


@runtime_checkable
class IdempotencyStore(Protocol):
    """Where idempotency keys live. Client errors are mapped to `StoreUnavailable`."""

    async def claim(self, key: str, owner: str, *, lease: float) -> ClaimResult:
        """Claim ``key`` for ``owner`` for ``lease`` seconds if it is free: ``"claimed"``;
        ``"done"`` if a run completed it; ``"busy"`` if a live claim holds it (any owner)."""
        ...

    async def extend(
        self, claims: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        """Extend each claim ``(key, owner)`` to ``lease`` seconds from now; returns those
        no longer held by their owner (lapsed, released, or completed)."""
        ...

    async def complete(self, key: str, owner: str, *, ttl: float) -> bool:
        """Mark ``key`` done for ``ttl`` seconds if ``owner`` still holds it; False if not."""
        ...

    async def release(self, key: str, owner: str) -> bool:
        """Free ``key`` if ``owner`` still holds it, so a retry may claim it; False if not."""
        ...

    async def aclose(self) -> None: ...


def check_times(**seconds: float) -> None:
    """Leases and TTLs must be positive: a zero one would free a key at once."""
    for name, value in seconds.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0 seconds, got {value}")
