"""The in-memory idempotency store: the reference semantics, for tests and one process."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .base import ClaimResult, check_times


@dataclass(slots=True)
class _Record:
    owner: str | None  # None once done
    expires: float


class MemoryStore:
    """Keys in a dict, shared by every worker of the process that uses this instance.

    ``clock`` returns monotonic seconds; tests pass a fake one to lapse claims on demand.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: dict[str, _Record] = {}
        self._sweep_at = 1024

    def __repr__(self) -> str:
        return f"<MemoryStore keys={len(self._records)}>"

    def _live(self, key: str) -> _Record | None:
        record = self._records.get(key)
        if record is not None and record.expires <= self._clock():
            del self._records[key]
            return None
        return record

    def _held(self, key: str, owner: str) -> _Record | None:
        record = self._live(key)
        return record if record is not None and record.owner == owner else None

    def _put(self, key: str, record: _Record) -> None:
        self._records[key] = record
        if len(self._records) >= self._sweep_at:
            # Expired keys that are never looked up again would pile up: drop them all
            # whenever the table has doubled, which keeps the cost per write constant.
            now = self._clock()
            self._records = {k: r for k, r in self._records.items() if r.expires > now}
            self._sweep_at = max(1024, 2 * len(self._records))

    async def claim(self, key: str, owner: str, *, lease: float) -> ClaimResult:
        check_times(lease=lease)
        record = self._live(key)
        if record is None:
            self._put(key, _Record(owner, self._clock() + lease))
            return "claimed"
        return "done" if record.owner is None else "busy"

    async def extend(
        self, claims: Sequence[tuple[str, str]], *, lease: float
    ) -> list[tuple[str, str]]:
        check_times(lease=lease)
        expires = self._clock() + lease
        lost = []
        for key, owner in claims:
            record = self._held(key, owner)
            if record is None:
                lost.append((key, owner))
            else:
                record.expires = expires
        return lost

    async def complete(self, key: str, owner: str, *, ttl: float) -> bool:
        check_times(ttl=ttl)
        record = self._held(key, owner)
        if record is None:
            return False
        record.owner = None
        record.expires = self._clock() + ttl
        return True

    async def release(self, key: str, owner: str) -> bool:
        if self._held(key, owner) is None:
            return False
        del self._records[key]
        return True

    async def aclose(self) -> None:
        """Nothing to close; the keys stay, so a closed app can be reopened in-process."""

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
