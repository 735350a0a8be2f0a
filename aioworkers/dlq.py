"""A queue's dead letters: list, replay and purge (`App.dlq`, ``aioworkers dlq``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .brokers import Broker, DeadLetter, DeadLetterAdmin
from .envelope import reset_attempt
from .errors import ConfigError


class DeadLetterQueue:
    """List, replay and purge the dead letters of one queue."""

    # A replay takes at most this many entries (its snapshot); run it again for more.
    SCAN_LIMIT = 100_000
    # Entries published and removed per round trip.
    BATCH = 1000

    def __init__(self, broker: Broker, queue: str) -> None:
        if not isinstance(broker, DeadLetterAdmin):
            raise ConfigError(f"{type(broker).__name__} cannot list or remove dead letters")
        self.broker = broker
        self._admin: DeadLetterAdmin = broker
        self.queue = queue

    async def list(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters."""
        return await self._admin.dead_letters(self.queue, limit=limit)

    async def replay(self, ids: Iterable[str] | None = None) -> int:
        """Enqueue dead jobs again as first attempts (all, or those whose ``id`` or
        ``entry_id`` is in ``ids``), then remove them from the DLQ; returns how many.

        Only the entries present when the replay starts (at most `SCAN_LIMIT`) are
        replayed, each once: a replayed job that dies again meanwhile stays dead. A crash
        between publishing and removing leaves a job both queued and dead, never lost.
        """
        entries = await self.list(self.SCAN_LIMIT)
        if ids is not None:
            wanted = set(ids)
            entries = [e for e in entries if e.id in wanted or e.entry_id in wanted]
        return await self.replay_entries(entries)

    async def replay_entries(self, entries: Sequence[DeadLetter]) -> int:
        """Replay these entries (from `list`) as `replay` does; returns how many."""
        total = 0
        for start in range(0, len(entries), self.BATCH):
            batch = entries[start : start + self.BATCH]
            await self.broker.publish(self.queue, [reset_attempt(e.body) for e in batch])
            total += await self._admin.remove_dead_letters(self.queue, [e.entry_id for e in batch])
        return total

    async def purge(self) -> int:
        """Delete every dead letter of the queue; returns how many."""
        return await self._admin.remove_dead_letters(self.queue, None)
