"""Paging a Redis DLQ stream (``<queue>:dead``) by entry id: XREVRANGE / XRANGE from the
cursor with COUNT, so a page reads at most its own entries and two more, however long
the stream (`DeadLetterPages`)."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from ._kit import chunks
from ._redis_io import read_dead_letter, text
from .base import DeadLetter, DeadLetterPage

# An entry id as Redis writes one: two 64-bit integers (longer would be a server error).
STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
_CHUNK = 500  # ids read per pipeline


def _cursor(cursor: str) -> str:
    if not STREAM_ID.fullmatch(cursor):
        raise ValueError(f"not a dead-letter cursor: {cursor[:40]!r}")
    return cursor


def _sort_key(entry: DeadLetter) -> tuple[int, int]:
    ms, seq = entry.entry_id.split("-")
    return int(ms), int(seq)


async def page(
    redis: Any, queue: str, dead: str, *, before: str | None, after: str | None, limit: int
) -> DeadLetterPage:
    """One pipelined MULTI: the page, read away from the cursor (``limit + 1`` entries:
    the last only says there are more), and at most one entry at or past the cursor the
    other way (whether there is a page on that side)."""
    async with redis.pipeline(transaction=True) as pipe:
        if after is not None:
            start = f"({_cursor(after)}" if after else "-"
            pipe.xrange(dead, min=start, max="+", count=limit + 1)
            if after:
                pipe.xrevrange(dead, max=after, min="-", count=1)
        else:
            end = f"({_cursor(before)}" if before is not None else "+"
            pipe.xrevrange(dead, max=end, min="-", count=limit + 1)
            if before is not None:
                pipe.xrange(dead, min=before, max="+", count=1)
        replies = await pipe.execute()
    read = [read_dead_letter(queue, text(i), fields) for i, fields in replies[0]]
    beyond = len(replies) > 1 and bool(replies[1])
    return DeadLetterPage.of(read, limit=limit, newest_first=after is None, beyond=beyond)


async def by_id(redis: Any, queue: str, dead: str, entry_ids: Collection[str]) -> list[DeadLetter]:
    """The entries among ``entry_ids`` (an XRANGE id id each), oldest first."""
    ids = sorted({i for i in entry_ids if STREAM_ID.fullmatch(i)})
    found: list[DeadLetter] = []
    for chunk in chunks(ids, _CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for entry_id in chunk:
                pipe.xrange(dead, min=entry_id, max=entry_id, count=1)
            for reply in await pipe.execute():
                found += [read_dead_letter(queue, text(i), fields) for i, fields in reply]
    return sorted(found, key=_sort_key)
