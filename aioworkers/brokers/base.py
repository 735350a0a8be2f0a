"""The Broker protocol: the only thing a backend implements."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# Seconds a delivery stays leased when a call passes no lease: App.visibility_timeout's default.
DEFAULT_LEASE = 30.0


@dataclass(eq=False, slots=True)
class Delivery:
    """One hand-out of a message by a broker.

    ``count`` is how many times this message has been delivered (1 on the first delivery;
    a `Broker.release` at shutdown is not counted, so a restart never makes a job look
    poisonous); ``token`` is broker-private (lease token, delivery tag, receipt handle). Identity
    equality: two deliveries of the same message are different deliveries.
    """

    queue: str
    message_id: str
    body: bytes
    count: int = 1
    token: Any = None

    def __repr__(self) -> str:
        return f"<Delivery {self.queue} {self.message_id} count={self.count}>"


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """Jobs by state: ready to run, leased by a worker, waiting for their eta, dead-lettered."""

    ready: int = 0
    in_flight: int = 0
    delayed: int = 0
    dead: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A job in the dead-letter queue and why it is there.

    ``id`` is the job id, or the broker's message id when the body could not be decoded.
    ``reason`` is one of ``max_retries``, ``rejected``, ``max_deliveries`` or a decode
    reason (``payload_too_large``, ``decode_error``, ``schema_error``, ``unknown_task``,
    ``bad_arguments``). ``error`` is ``"Type: message"`` with secrets redacted.
    ``entry_id`` and ``body`` are filled in by the broker that stores the entry.
    """

    id: str
    task: str | None
    reason: str
    error: str | None
    attempts: int
    error_type: str | None = None
    traceback: str | None = None
    dead_at: float = 0.0
    queue: str = ""
    entry_id: str = ""
    body: bytes = b""

    def facts(self) -> dict[str, str | int | float]:
        """What a broker stores beside the body, by name: the fields that are set, with
        ``dead_at`` stamped now if it is not. `from_facts` reads them back."""
        facts = {
            "id": self.id,
            "task": self.task,
            "reason": self.reason,
            "error": self.error,
            "error_type": self.error_type,
            "traceback": self.traceback,
            "attempts": self.attempts,
            "dead_at": self.dead_at or time.time(),
        }
        return {name: value for name, value in facts.items() if value is not None}

    @classmethod
    def from_facts(
        cls,
        get: Callable[[str], str | None],
        *,
        queue: str,
        entry_id: str,
        body: bytes,
        dead_at: float = 0.0,
    ) -> DeadLetter:
        """The letter whose `facts` ``get`` returns as text by name (None if missing);
        ``dead_at`` is used when the store has none."""
        stamped = get("dead_at")
        return cls(
            id=get("id") or entry_id,
            task=get("task"),
            reason=get("reason") or "unknown",
            error=get("error"),
            attempts=int(float(get("attempts") or 1)),
            error_type=get("error_type"),
            traceback=get("traceback"),
            dead_at=float(stamped) if stamped else dead_at,
            queue=queue,
            entry_id=entry_id,
            body=body,
        )


@runtime_checkable
class Broker(Protocol):
    """A queue backend: only what the runtime needs. Client errors are mapped to
    `BrokerUnavailable` (transient) and `LeaseLost` (the delivery is no longer ours); what a
    backend lacks it emulates itself. Optional parts are the capabilities below, each
    checked with ``isinstance``.

    A *lease* is how long a delivery stays this worker's without an `extend`: after it,
    another worker may get the message. The runtime passes it on every `fetch` and `extend`
    (``App.visibility_timeout``, the one source of truth); each broker's docstring says how
    it keeps one.
    """

    async def publish(self, queue: str, bodies: Sequence[bytes], *, delay: float = 0.0) -> None:
        """Store a batch; returns once the broker has them. ``delay`` in seconds."""
        ...

    async def fetch(
        self, queue: str, *, max_messages: int, wait: float, lease: float
    ) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, waiting at most ``wait`` seconds for the first,
        each leased for ``lease`` seconds."""
        ...

    async def stop_fetching(self, queue: str) -> None:
        """This worker will not fetch from ``queue`` for now: hand back at once anything the
        client holds that `fetch` has not returned yet (a push consumer's prefetch), so
        other workers get it. A later `fetch` starts again. Pull-only brokers do nothing."""
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Remove finished deliveries; returns those skipped because their lease was lost
        while the message is still there (another worker may hold it now). A delivery
        already acked (an ack retried after its reply was lost) is not reported."""
        ...

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> None:
        """Replace the delivery by a new message ``body`` visible after ``delay`` seconds.
        Raises `LeaseLost` if the delivery is no longer ours."""
        ...

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back unfinished deliveries, visible again at once (shutdown). A release is
        not a delivery: the next delivery of the message carries the count it had before
        this one (see `handed_back`)."""
        ...

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
        """Keep deliveries leased for ``lease`` more seconds from now; returns those lost."""
        ...

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        """Store the delivery in the DLQ (confirmed first), then remove the original.
        Raises `LeaseLost` if the delivery is no longer ours."""
        ...

    async def depth(self, queue: str) -> QueueDepth: ...

    async def aclose(self) -> None: ...


def handed_back(delivery: Delivery) -> int:
    """The delivery count a message handed back by `Broker.release` carries: the deliveries
    before this one, which was no delivery (a shutdown never makes a job look poisonous)."""
    return max(delivery.count - 1, 0)


# -- capabilities: optional parts, each checked with isinstance -------------------------------


@runtime_checkable
class DeadLetterAdmin(Protocol):
    """Lists and removes dead letters (``aioworkers dlq``, `App.dlq`)."""

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` entries of the queue's DLQ."""
        ...

    async def remove_dead_letters(self, queue: str, entry_ids: Collection[str] | None) -> int:
        """Delete DLQ entries by ``entry_id`` (all of them for ``None``); returns how many."""
        ...


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    """One page of a DLQ, newest entry first. ``older`` is the cursor of the next page
    toward the oldest entry (None: this page ends with the oldest), ``newer`` the cursor of
    the page before it (None: it starts with the newest). A cursor is an ``entry_id``."""

    entries: list[DeadLetter]
    older: str | None
    newer: str | None

    @classmethod
    def of(
        cls, read: Sequence[DeadLetter], *, limit: int, newest_first: bool, beyond: bool
    ) -> DeadLetterPage:
        """The page from ``read``: up to ``limit + 1`` entries read away from the cursor
        (``newest_first``: toward the oldest), the one past ``limit`` only saying that
        more lie that way; ``beyond``: whether any entry lies the other way."""
        more = len(read) > limit
        entries = list(read[:limit]) if newest_first else list(reversed(read[:limit]))
        if not entries:
            return cls([], None, None)
        older = more if newest_first else beyond
        newer = beyond if newest_first else more
        return cls(
            entries,
            older=entries[-1].entry_id if older else None,
            newer=entries[0].entry_id if newer else None,
        )


def entry_number(cursor: str) -> int:
    """A cursor of a broker whose entry ids are integers (memory, SQLite, PostgreSQL)."""
    if not (cursor.isascii() and cursor.isdigit() and len(cursor) < 19):
        raise ValueError(f"not a dead-letter cursor: {cursor[:40]!r}")
    return int(cursor)


def entry_numbers(entry_ids: Collection[str]) -> list[int]:
    """The ids among ``entry_ids`` that can be integer entry ids, the others dropped."""
    return [int(e) for e in entry_ids if e.isascii() and e.isdigit() and len(e) < 19]


@runtime_checkable
class DeadLetterPages(Protocol):
    """Pages through a DLQ by cursor (keyset, never an offset): each call reads one page,
    however long the DLQ. Brokers that can only list from the front (RabbitMQ, SQS) lack it."""

    async def dead_letter_page(
        self, queue: str, *, before: str | None = None, after: str | None = None, limit: int = 50
    ) -> DeadLetterPage:
        """The ``limit`` entries just older than the cursor ``before``, or just newer than
        ``after`` (``after=""``: the oldest ``limit``), or the newest ``limit`` when neither
        is given. A cursor whose entry was removed still works; one that cannot be an
        ``entry_id`` of this broker raises ``ValueError``."""
        ...

    async def dead_letters_by_id(self, queue: str, entry_ids: Collection[str]) -> list[DeadLetter]:
        """The entries among ``entry_ids`` still in the DLQ, oldest first (ids that cannot
        be this broker's are ignored)."""
        ...


# A delivery's job id and whether its cancel mark is set, as a broker read them.
Screened = tuple[str, bool]


@runtime_checkable
class ScreensCancelMarks(Protocol):
    """A broker that can read the state store's cancel marks in the same step as it fetches
    (Redis, with the store on its server): the runtime then reads none for those jobs."""

    def screen_cancel_marks(self, server: str, prefix: str) -> bool:
        """Read the marks at keys ``prefix`` + job id, if ``server`` is this broker's;
        returns whether it will."""
        ...

    async def fetch_screened(
        self, queue: str, *, max_messages: int, wait: float, lease: float | None = None
    ) -> tuple[list[Delivery], list[Screened | None]]:
        """`Broker.fetch`, and per delivery what was read of its cancel mark (None: not
        read, the runtime reads it)."""
        ...


@runtime_checkable
class Totals(Protocol):
    """Counters for rates (``aioworkers stats --watch``)."""

    async def totals(self, queue: str) -> dict[str, int]:
        """``added``: messages ever added to the queue (new jobs, and retries); ``left``:
        those that left it (acked, retried or dead-lettered); ``dead``: dead letters ever
        written."""
        ...


@runtime_checkable
class DeadLetterWriter(Protocol):
    """Writes a dead letter for a message it never delivered (the Lambda adapter, where
    Lambda itself received the record)."""

    async def send_dead_letter(self, queue: str, body: bytes, letter: DeadLetter) -> None: ...


@runtime_checkable
class QueueNaming(Protocol):
    """Maps a queue's native name (an SQS queue name in an event source ARN) back to the
    aioworkers queue name."""

    def queue_name(self, native_name: str) -> str: ...


@runtime_checkable
class MessagingSystem(Protocol):
    """A broker that names its OpenTelemetry ``messaging.system`` (``redis``,
    ``rabbitmq``, ``aws_sqs``, ``sqlite``, ``memory``)."""

    @property
    def messaging_system(self) -> str: ...


@runtime_checkable
class FileBacked(Protocol):
    """A broker whose jobs live in a local file (the CLI refuses to create a missing one)."""

    @property
    def path(self) -> Path: ...


@runtime_checkable
class ConfiguredLease(Protocol):
    """A broker built with a default lease (``visibility_timeout``, None if it was not
    given) for calls that pass none. An `App` refuses one that disagrees with its own."""

    @property
    def visibility_timeout(self) -> float | None: ...


# The broker metadata key that carries a foreign message's attempt (AMQP header, SQS message
# attribute); an absent one means attempt 1.
ATTEMPT_HEADER = "aioworkers-attempt"


@runtime_checkable
class RawRetry(Protocol):
    """A broker that keeps a foreign message's metadata (`aioworkers.Message`): its headers
    or attributes, and a retry that re-publishes the original body unchanged with the
    attempt in ``ATTEMPT_HEADER``. A broker without it gets the attempt carried in a
    prefix of the stored body, taken off before the consumer sees it."""

    def message_meta(self, delivery: Delivery) -> tuple[str | None, dict[str, Any]]:
        """The delivery's routing key (None where there is none) and headers."""
        ...

    async def retry_raw(
        self, delivery: Delivery, *, body: bytes, attempt: int, delay: float
    ) -> None:
        """Like `Broker.retry`: ``body`` as it is, ``attempt`` in its metadata."""
        ...
