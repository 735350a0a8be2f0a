"""Dead letters as the dashboard pages them: never the whole DLQ. On a broker with
cursors (`DeadLetterPages`: memory, Redis, SQLite, PostgreSQL) a page is read by cursor,
newest first: one page a request, however long the DLQ. RabbitMQ and SQS list from the
oldest only, so there page N reads every entry before it (SQS: the whole DLQ); paging
stops at `MAX_BROWSE` entries, and the page says so. Replay and purge of *all* work in
batches of any size."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson

from ..app import App, DeadLetterQueue
from ..brokers.base import DeadLetter, DeadLetterAdmin, MessagingSystem
from ..envelope import decode
from ..errors import AioworkersError, redact

PAGE_SIZE = 50
SIZES = (50, 200, 500)  # the page sizes a request may ask for
RECENT = 10  # dead letters on a queue's page
MAX_BROWSE = 1000  # entries reachable by page number on a broker without cursors
MAX_CURSOR = 64  # characters of a cursor taken from a request
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
class View:
    """The page asked for: by cursor (``before`` / ``after``; ``after=""`` is the oldest
    page; neither, the newest), or by number on a broker without cursors."""

    before: str | None = None
    after: str | None = None
    page: int = 1
    size: int = PAGE_SIZE
    load: bool = False  # SQS: list on request only

    @classmethod
    def of(cls, params: Mapping[str, str]) -> View:
        """From a query string's (or a form's) values; anything unexpected is dropped."""

        def cursor(name: str) -> str | None:
            value = params.get(name)
            return value if value is not None and len(value) <= MAX_CURSOR else None

        size = _int(params.get("size"), PAGE_SIZE)
        return cls(
            before=cursor("before"),
            after=cursor("after") if params.get("before") is None else None,
            page=max(_int(params.get("page"), 1), 1),
            size=size if size in SIZES else PAGE_SIZE,
            load=params.get("load") == "1",
        )

    def query(self, **changes: Any) -> str:
        """This view (with ``changes``) as a query string, without a leading ``?``."""
        v = replace(self, **changes)
        q: dict[str, str | int] = {}
        if v.before is not None:
            q["before"] = v.before
        elif v.after is not None:
            q["after"] = v.after
        elif v.page > 1:
            q["page"] = v.page
        if v.size != PAGE_SIZE:
            q["size"] = v.size
        if v.load:
            q["load"] = "1"
        return urlencode(q)


@dataclass(frozen=True, slots=True)
class DeadPage:
    queue: str
    letters: list[Letter]
    view: View
    total: int | None  # the DLQ's size from the broker's counter
    cursors: bool  # paged by cursor, newest first (else by number, oldest first)
    expensive: bool  # listing reads the whole DLQ (SQS): only on request
    listed: bool
    # rel -> the query string of the page: "first" (newest, or page 1), "prev", "next",
    # "last" (the oldest page; only with cursors).
    links: dict[str, str] = field(default_factory=dict)
    capped: bool = False  # without cursors: the next page would be past MAX_BROWSE
    error: str | None = None

    @property
    def sizes(self) -> dict[int, str]:
        """The page sizes offered, each with the query string of this page in that size."""
        return {n: self.view.query(size=n) for n in SIZES}


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
    app: App, queue: str, view: View, *, show_args: bool, total: int | None
) -> DeadPage:
    """The page ``view`` asks for; a broker's failure is the page's ``error``."""
    costly = expensive(app)
    try:
        dlq = app.dlq(queue)
        if dlq.pages:
            return await _by_cursor(dlq, view, show_args=show_args, total=total)
        if costly and not view.load:
            return DeadPage(queue, [], view, total, False, True, False)
        return await _by_number(dlq, view, show_args=show_args, total=total, costly=costly)
    except ValueError:
        error = "That is not a cursor of this dead-letter queue."
        return DeadPage(queue, [], view, total, True, False, False, {"first": ""}, error=error)
    except (AioworkersError, OSError) as exc:
        error = redact(f"{type(exc).__name__}: {exc}", 300)
        return DeadPage(queue, [], view, total, False, costly, False, error=error)


async def _by_cursor(
    dlq: DeadLetterQueue, view: View, *, show_args: bool, total: int | None
) -> DeadPage:
    found = await dlq.page(before=view.before, after=view.after, limit=view.size)
    top = View(size=view.size)
    links: dict[str, str] = {}
    if found.newer is not None or (not found.entries and view != top):
        links["first"] = top.query()
    if found.newer is not None:
        links["prev"] = top.query(after=found.newer)
    if found.older is not None:
        links["next"] = top.query(before=found.older)
        links["last"] = top.query(after="")
    letters = [letter(e, show_args=show_args) for e in found.entries]
    return DeadPage(dlq.queue, letters, view, total, True, False, True, links)


async def _by_number(
    dlq: DeadLetterQueue, view: View, *, show_args: bool, total: int | None, costly: bool
) -> DeadPage:
    size = view.size
    last = max(MAX_BROWSE // size, 1)
    page = min(view.page, last)
    view = replace(view, before=None, after=None, page=page)
    offset = (page - 1) * size
    # One more than the page: whether a next page exists, without counting the DLQ.
    entries = await dlq.list(offset + size + 1)
    more = len(entries) > offset + size
    links: dict[str, str] = {}
    if page > 1:
        links["first"] = view.query(page=1)
        links["prev"] = view.query(page=page - 1)
    if more and page < last:
        links["next"] = view.query(page=page + 1)
    letters = [letter(e, show_args=show_args) for e in entries[offset : offset + size]]
    capped = more and page >= last
    return DeadPage(dlq.queue, letters, view, total, False, costly, True, links, capped)


async def replay_some(app: App, queue: str, view: View, entry_ids: Collection[str]) -> int:
    """Replay the chosen entries: read by id with cursors; without, from a listing up
    to the end of the page they were chosen on (entries only ever leave from the front or
    the middle, so they are still before it)."""
    dlq = app.dlq(queue)
    if dlq.pages:
        chosen = await dlq.get(entry_ids)
    else:
        end = min(view.page, max(MAX_BROWSE // view.size, 1)) * view.size
        wanted = set(entry_ids)
        chosen = [e for e in await dlq.list(end) if e.entry_id in wanted]
    return await dlq.replay_entries(chosen)


async def replay_all(app: App, queue: str, total: int) -> int:
    """Replay the entries the DLQ held when asked, a batch at a time (never all in
    memory): a job that dies again meanwhile stays dead. With cursors, newest first;
    without, the ``total`` oldest."""
    dlq = app.dlq(queue)
    if dlq.pages or expensive(app):
        return await dlq.replay()  # SQS: each listing reads the whole DLQ, so one pass
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


def _int(value: str | None, default: int) -> int:
    return int(value) if value and value.isdigit() and len(value) < 7 else default
