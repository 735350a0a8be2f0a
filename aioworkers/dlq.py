"""A queue's dead letters: list, replay and purge (`App.dlq`, ``aioworkers dlq``)."""

from __future__ import annotations

import builtins
from collections.abc import Collection, Iterable, Sequence

from .brokers import Broker, DeadLetter, DeadLetterAdmin, DeadLetterPage, DeadLetterPages
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

    @property
    def pages(self) -> bool:
        """Whether the broker pages by cursor (`page`); RabbitMQ and SQS list from the
        front only (`list`), reading every entry before the last one asked for."""
        return isinstance(self.broker, DeadLetterPages)

    async def page(
        self, *, before: str | None = None, after: str | None = None, limit: int = 50
    ) -> DeadLetterPage:
        """One page of dead letters, newest first: the ``limit`` just older than the
        cursor ``before``, just newer than ``after`` (``after=""``: the oldest page), or
        the newest. Follow ``.older`` / ``.newer`` of the page for the next one; each call
        reads one page however long the DLQ. A malformed cursor raises ``ValueError``;
        a broker without cursors (`pages` is False) a `ConfigError`."""
        if not isinstance(self.broker, DeadLetterPages):
            raise ConfigError(
                f"{type(self.broker).__name__} lists dead letters from the oldest only: use list()"
            )
        return await self.broker.dead_letter_page(
            self.queue, before=before, after=after, limit=limit
        )

    async def get(self, entry_ids: Collection[str]) -> builtins.list[DeadLetter]:
        """The entries among ``entry_ids`` still dead, oldest first (without cursors: by
        listing up to `SCAN_LIMIT` entries)."""
        if isinstance(self.broker, DeadLetterPages):
            return await self.broker.dead_letters_by_id(self.queue, entry_ids)
        wanted = set(entry_ids)
        return [e for e in await self.list(self.SCAN_LIMIT) if e.entry_id in wanted]

    async def replay(self, ids: Iterable[str] | None = None) -> int:
        """Enqueue dead jobs again as first attempts (all, or those whose ``id`` or
        ``entry_id`` is in ``ids``), then remove them from the DLQ; returns how many.

        Only the entries present when the replay starts are replayed, each once: a
        replayed job that dies again meanwhile stays dead. With cursors (`pages`), all of
        them, newest first, `BATCH` at a time; without, at most `SCAN_LIMIT`, listed first.
        A crash between publishing and removing leaves a job both queued and dead, never
        lost.
        """
        if ids is None and isinstance(self.broker, DeadLetterPages):
            return await self._replay_pages(self.broker)
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

    async def _replay_pages(self, pages: DeadLetterPages) -> int:
        # Walking toward the oldest from the newest entry at the start: an entry dead
        # again after its replay is newer than every cursor, so it is never reached. A
        # cursor whose entry was removed (replayed) still works.
        total = 0
        page = await pages.dead_letter_page(self.queue, limit=self.BATCH)
        while page.entries:
            total += await self.replay_entries(page.entries[::-1])
            if page.older is None:
                break
            page = await pages.dead_letter_page(self.queue, before=page.older, limit=self.BATCH)
        return total

    async def purge(self) -> int:
        """Delete every dead letter of the queue; returns how many."""
        return await self._admin.remove_dead_letters(self.queue, None)
