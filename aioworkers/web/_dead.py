"""Dead letters as the dashboard pages them: never the whole DLQ. A page reads the oldest
entries up to its end (the `DeadLetterAdmin` capability has no cursor), so browsing stops
at `MAX_BROWSE` entries; replay and purge of *all* work in batches of any size."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from ..app import App, DeadLetterQueue
from ..brokers.base import DeadLetter, DeadLetterAdmin, MessagingSystem
from ..envelope import decode
from ..errors import AioworkersError, redact

PAGE_SIZE = 50
MAX_BROWSE = 1000  # entries reachable by paging; the rest by replaying or purging those first
TEXT_LIMIT = 20_000  # characters of an error, traceback or arguments shown


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter, fit to show: secrets redacted, arguments only when allowed."""

    entry_id: str
    id: str
    task: str
    reason: str
    error: str
    traceback: str
    attempts: int
    dead_at: str
    size: int
    arguments: str | None


@dataclass(frozen=True, slots=True)
class DeadPage:
    queue: str
    letters: list[Letter]
    page: int
    total: int | None  # the DLQ's size from the broker's counter
    has_next: bool
    capped: bool  # the next page would be past MAX_BROWSE
    expensive: bool  # listing reads the whole DLQ (SQS): only on request
    listed: bool
    error: str | None = None


def expensive(app: App) -> bool:
    """Whether listing dead letters reads the whole DLQ (SQS cannot peek)."""
    broker = app.broker
    return isinstance(broker, MessagingSystem) and broker.messaging_system == "aws_sqs"


def _when(epoch: float) -> str:
    if not epoch:
        return ""
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds")


def _arguments(body: bytes) -> str:
    try:
        env = decode(body)
    except (AioworkersError, ValueError):
        return f"(a body that does not decode, {len(body)} bytes)"
    text = orjson.dumps({"args": env.args, "kwargs": env.kwargs}, option=orjson.OPT_INDENT_2)
    return redact(text.decode(), TEXT_LIMIT)


def letter(entry: DeadLetter, *, show_args: bool) -> Letter:
    return Letter(
        entry_id=entry.entry_id,
        id=entry.id,
        task=entry.task or "",
        reason=entry.reason,
        error=redact(entry.error or "", TEXT_LIMIT),
        traceback=redact(entry.traceback or "", TEXT_LIMIT, keep_end=True),
        attempts=entry.attempts,
        dead_at=_when(entry.dead_at),
        size=len(entry.body),
        arguments=_arguments(entry.body) if show_args else None,
    )


async def read_page(
    app: App, queue: str, page: int, *, show_args: bool, load: bool, total: int | None
) -> DeadPage:
    costly = expensive(app)
    last = MAX_BROWSE // PAGE_SIZE
    page = min(max(page, 1), last)
    if costly and not load:
        return DeadPage(queue, [], page, total, False, False, True, False)
    offset = (page - 1) * PAGE_SIZE
    try:
        # One more than the page: whether a next page exists, without counting the DLQ.
        entries = await app.dlq(queue).list(offset + PAGE_SIZE + 1)
    except (AioworkersError, OSError) as exc:
        error = redact(f"{type(exc).__name__}: {exc}", 300)
        return DeadPage(queue, [], page, total, False, False, costly, False, error)
    shown = entries[offset : offset + PAGE_SIZE]
    more = len(entries) > offset + PAGE_SIZE
    return DeadPage(
        queue,
        [letter(e, show_args=show_args) for e in shown],
        page,
        total,
        has_next=more and page < last,
        capped=more and page >= last,
        expensive=costly,
        listed=True,
    )


async def replay_some(app: App, queue: str, page: int, entry_ids: Collection[str]) -> int:
    """Replay the chosen entries of ``page`` (read again: only entries before its end
    can be among them, entries only ever leave from the front or the middle)."""
    dlq = app.dlq(queue)
    end = min(max(page, 1), MAX_BROWSE // PAGE_SIZE) * PAGE_SIZE
    wanted = set(entry_ids)
    chosen = [e for e in await dlq.list(end) if e.entry_id in wanted]
    return await dlq.replay_entries(chosen)


async def replay_all(app: App, queue: str, total: int) -> int:
    """Replay the ``total`` entries the DLQ held when asked, oldest first, a batch at a
    time (never all in memory): a job that dies again meanwhile goes to the end and stays."""
    dlq = app.dlq(queue)
    if expensive(app):
        return await dlq.replay()  # each listing reads the whole DLQ: one pass only
    done = 0
    while done < total:
        batch = await dlq.list(min(DeadLetterQueue.BATCH, total - done))
        replayed = await dlq.replay_entries(batch) if batch else 0
        if replayed == 0:
            break
        done += replayed
    return done


async def purge(app: App, queue: str, entry_ids: Collection[str] | None) -> int:
    """Delete the chosen entries (all for None)."""
    broker = app.broker
    if not isinstance(broker, DeadLetterAdmin):
        app.dlq(queue)  # raises the ConfigError that says so
        return 0
    return await broker.remove_dead_letters(queue, entry_ids)
