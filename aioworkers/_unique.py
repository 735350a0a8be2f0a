"""Unique enqueue: one job in the system per ``unique_key``.

The key is held in the state store (`Store.hold_unique`) by the job's id from its enqueue
(before it is published) until the job ends: the worker that settles it as succeeded,
failed (dead-lettered) or cancelled frees it (`_runtime.unique.free_ended`). The hold
expires after ``unique_for`` seconds whatever happens, so a key whose job was lost is
never held for ever. The job carries its key in the envelope header `UNIQUE_HEADER`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from ._runtime.unique import UNIQUE_HEADER
from .job import running_job
from .store.base import Store

DEFAULT_UNIQUE_FOR = 3600.0


class Holds:
    """The unique keys one `App.enqueue_many` call holds, freed again if its publish fails."""

    __slots__ = ("_held", "_store")

    def __init__(self, store: Callable[[], Store]) -> None:
        self._store = store
        self._held: list[tuple[str, str]] = []

    async def hold(self, key: str, unique_for: float | None, job_id: str) -> str | None:
        """Hold ``key`` for the new job ``job_id`` (``unique_for`` seconds at most): None
        if it may be published, else the id of the job that has the key (nothing is to be
        published).

        A job enqueuing under the key it holds itself (from its handler) hands the key to
        its successor: the successor is published and holds the key from now on."""
        store = self._store()
        ttl = DEFAULT_UNIQUE_FOR if unique_for is None else unique_for
        holder = await store.hold_unique(key, job_id, ttl=ttl)
        if holder is not None:
            current = running_job()
            if current is None or current.id != holder:
                return holder
            # Ours: hand it over. If another producer takes the key in between, its job is
            # the one in the system and ours is not published.
            await store.free_unique(key, holder)
            holder = await store.hold_unique(key, job_id, ttl=ttl)
            if holder is not None:
                return holder
        self._held.append((key, job_id))
        return None

    async def undo(self) -> None:
        """The publish failed: free the keys held for jobs that may not exist."""
        if not self._held:
            return  # the common case: no unique key, and no store to open
        store = self._store()
        for key, job_id in self._held:
            with contextlib.suppress(Exception):  # else the hold expires with unique_for
                await store.free_unique(key, job_id)
        self._held.clear()


__all__ = ["DEFAULT_UNIQUE_FOR", "UNIQUE_HEADER", "Holds"]
