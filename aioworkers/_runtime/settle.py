"""Settle each delivery exactly once: the one place an outcome's decision becomes broker
calls, and the one place a delivery is counted as an outcome.

How the calls reach the broker is a `Completer` (River's model): `BatchedAcks` for a
worker (acks batched, every call retried while the broker is down), `InlineCompleter` for
the Lambda adapter (each call once, at once).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Protocol, TypeVar

from ..brokers.base import Broker, DeadLetter, DeadLetterWriter, Delivery
from ..envelope import encode
from ..errors import BrokerUnavailable, LeaseLost, printable
from ..store.base import JobFinish
from ..telemetry.worker import WorkerTelemetry
from .backoff import backoff
from .clock import SYSTEM_CLOCK, Clock
from .failure import MAX_ERROR_CHARS, dead_letter_for, job_fields, log_failure
from .foreign import ForeignEnvelope, retry_body
from .outcome import Ack, Dead, Defer, Outcome, OutcomeName, Release, RetryLater, Snoozed
from .summary import log_job

log = logging.getLogger("aioworkers")

T = TypeVar("T")


class OutcomeUnknown(Exception):
    """A settle call failed with `BrokerUnavailable`, whose result is unknown (the broker
    may have applied it and the reply been lost), and the broker refused the re-send as
    `LeaseLost`: either the first call was applied, or the lease was lost meanwhile.

    A broker that recognises the re-send of a call it applied answers it as done (the
    memory broker, by the delivery's lease token), so this is raised only where the broker
    cannot tell (Redis); it is then counted as neither outcome.
    """


class Completer(Protocol):
    """Carries a settle decision to the broker. Each call returns False if it left the
    delivery to the broker to hand out again instead (counted as released), and raises
    `LeaseLost` (or `OutcomeUnknown`) if the delivery is no longer ours."""

    async def ack(self, delivery: Delivery, finishes: list[JobFinish] | None = None) -> bool:
        """``finishes``: the job's final records, written before the ack is sent."""
        ...

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> bool: ...

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> bool: ...

    async def retry_foreign(self, delivery: Delivery, *, attempt: int, delay: float) -> bool:
        """A consumer's message again, its original body as ``attempt`` (`retry_body`)."""
        ...

    async def release(self, deliveries: Sequence[Delivery], *, again: bool = True) -> bool:
        """``again=False``: one try, for deliveries that never started (a shutdown does
        not wait on a broker that is down for them; their leases run out)."""
        ...


class Settler:
    """Turns outcomes into `Completer` calls and counts each delivery once."""

    def __init__(
        self,
        completer: Completer,
        *,
        telemetry: WorkerTelemetry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._completer = completer
        self._telemetry = telemetry
        self._clock = clock
        self.counts: Counter[str] = Counter()

    def count(self, name: OutcomeName, delivery: Delivery, outcome: Outcome | None = None) -> None:
        """The one place a delivery is counted as an outcome: `counts`, and the metrics and
        span of the job when telemetry is on."""
        self.counts[name] += 1
        if self._telemetry is not None:
            self._telemetry.settled(name, delivery, outcome)
        if log.isEnabledFor(logging.DEBUG):  # a cached level check: free when off
            log_job(name, delivery, outcome)

    async def settle(self, delivery: Delivery, outcome: Outcome) -> OutcomeName | None:
        """Apply ``outcome.decision``; returns what the delivery was counted as (None: the
        broker's answer left that unknown)."""
        try:
            decision = outcome.decision
            if isinstance(decision, Ack):  # the hot path: no detour
                done = await self._completer.ack(delivery, outcome.finishes)
            else:
                done = await self._apply(delivery, outcome)
        except OutcomeUnknown as exc:
            _unknown(delivery, outcome, exc)
            return None
        except LeaseLost:
            return self._lease_lost(delivery, outcome)
        name = decision.name
        if not done:
            log.warning(
                "%r not %s: left to the broker to deliver again",
                delivery,
                name,
                extra={"job": job_fields(delivery, outcome)},
            )
            name = OutcomeName.RELEASED
        self.count(name, delivery, outcome)
        return name

    def acked(
        self, delivery: Delivery, outcome: Outcome, answer: bool | BaseException
    ) -> OutcomeName | None:
        """Count an ack made with `BatchedAcks.ack_later` once the broker answered it:
        ``answer`` is True (acked), False (refused: the lease was lost), or what the batch
        raised; as `settle` counts an ack it awaited."""
        if answer is True:
            name = outcome.decision.name
            self.count(name, delivery, outcome)
            return name
        if answer is False or isinstance(answer, LeaseLost):
            return self._lease_lost(delivery, outcome)
        if isinstance(answer, OutcomeUnknown):
            _unknown(delivery, outcome, answer)
        elif isinstance(answer, Exception):
            log.error(
                "internal error while acking %r; the broker will redeliver it",
                delivery,
                exc_info=answer,
            )
        return None  # cancelled (a shutdown past its grace): counted as nothing

    def acked_many(self, answered: list[Answered], refused: set[int] | BaseException) -> None:
        """`acked` for a batch: ``refused`` holds the ``id()`` of the deliveries the broker
        refused, or is what the batch raised."""
        if (
            isinstance(refused, set)
            and not refused
            and self._telemetry is None
            and not log.isEnabledFor(logging.DEBUG)
        ):
            # The usual batch: every ack taken, nothing to record per job but its count.
            counts = self.counts
            for _, outcome in answered:
                counts[outcome.decision.name] += 1
            return
        for delivery, outcome in answered:
            answer = refused if isinstance(refused, BaseException) else id(delivery) not in refused
            self.acked(delivery, outcome, answer)

    def _lease_lost(self, delivery: Delivery, outcome: Outcome) -> OutcomeName:
        self.count(OutcomeName.LEASE_LOST, delivery, outcome)
        log.warning(
            "lease lost, not settling %r (another worker owns it now)",
            delivery,
            extra={"job": job_fields(delivery, outcome)},
        )
        return OutcomeName.LEASE_LOST

    async def _apply(self, delivery: Delivery, outcome: Outcome) -> bool:
        completer = self._completer
        match outcome.decision:
            case RetryLater(delay=delay):
                assert outcome.envelope is not None
                what = f"retry in {delay:.2f}s"
                log_failure(logging.WARNING, delivery, outcome, what, OutcomeName.RETRIED)
                if type(outcome.envelope) is ForeignEnvelope:  # the original body again
                    attempt = outcome.envelope.attempt + 1
                    return await completer.retry_foreign(delivery, attempt=attempt, delay=delay)
                body = encode(outcome.envelope.next_attempt())
                return await completer.retry(delivery, body=body, delay=delay)
            case Dead(reason=reason):
                letter = dead_letter_for(delivery, outcome, reason, dead_at=self._clock.time())
                what = f"dead-lettered ({reason})"
                log_failure(logging.ERROR, delivery, outcome, what, OutcomeName.DEAD)
                return await completer.dead_letter(delivery, letter)
            case Release():
                return await completer.release([delivery])
            case Defer(delay=delay):
                # The body unchanged: same attempt, so waiting on a key uses no retry.
                env = outcome.envelope
                job_id = printable(env.id if env is not None else delivery.message_id)
                why = printable(outcome.detail, MAX_ERROR_CHARS)
                name = outcome.decision.name  # deferred, or throttled (a limit)
                log.info("job %s id=%s for %.2fs: %s", name, job_id, delay, why)
                if type(env) is ForeignEnvelope:  # same attempt, in the broker's metadata
                    return await completer.retry_foreign(delivery, attempt=env.attempt, delay=delay)
                return await completer.retry(delivery, body=delivery.body, delay=delay)
            case Snoozed(delay=delay):
                assert outcome.envelope is not None
                if type(outcome.envelope) is ForeignEnvelope:  # snoozes are not counted
                    attempt = outcome.envelope.attempt
                    return await completer.retry_foreign(delivery, attempt=attempt, delay=delay)
                body = encode(outcome.envelope.snoozed())  # same attempt, one more snooze
                job_id = printable(outcome.envelope.id)
                log.info("job snoozed id=%s for %.2fs", job_id, delay)
                return await completer.retry(delivery, body=body, delay=delay)
        return await completer.ack(delivery)

    async def hand_back(self, deliveries: Sequence[Delivery]) -> None:
        """Release deliveries that never started, with one try: if the broker is down,
        their leases run out and it hands them out again."""
        try:
            released = await self._completer.release(deliveries, again=False)
        except Exception as exc:
            log.warning(
                "could not release %d jobs; their leases will expire: %s", len(deliveries), exc
            )
            return
        if released:
            for delivery in deliveries:
                self.count(OutcomeName.RELEASED, delivery)


def _unknown(delivery: Delivery, outcome: Outcome, exc: BaseException) -> None:
    # Counted as neither: "lease_lost" would be false if the first call was applied.
    log.warning(
        "outcome of %r unknown: applied with its reply lost, or its lease was lost "
        "meanwhile (counted as neither): %s",
        delivery,
        exc,
        extra={"job": job_fields(delivery, outcome)},
    )


# An ack waiting for its batch: the delivery, the future its job awaits (None for
# `BatchedAcks.ack_later`), the final records to write first, the outcome (ack_later).
# An ack made without waiting, answered: its delivery and the outcome acked.
Answered = tuple[Delivery, Outcome]
_Pending = tuple[
    Delivery, "asyncio.Future[bool] | None", "list[JobFinish] | None", "Outcome | None"
]


class BatchedAcks:
    """The worker's completer. Acks are batched: every ack that arrives while a round trip
    is in progress goes out together in the next one, and each job waits for its own to be
    confirmed. The final records the acks carry (``finishes``) are written by
    ``write_finishes`` just before (one call for the batch). Every call is retried while
    the broker is unavailable (see `backoff`)."""

    def __init__(
        self,
        broker: Broker,
        *,
        max_ack_batch: int = 1000,
        clock: Clock = SYSTEM_CLOCK,
        write_finishes: Callable[[list[JobFinish]], Awaitable[None]] | None = None,
    ) -> None:
        self._broker = broker
        self._clock = clock
        self._write_finishes = write_finishes
        # Each ack's future says whether the broker took it (False: the lease was lost),
        # and the final records to write before it; an `ack_later` has no future, its
        # outcome is handed to ``on_acked`` instead.
        self._acks: list[_Pending] = []
        self.on_acked: Callable[[list[Answered], set[int] | BaseException], None] | None = None
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._max_batch = max_ack_batch

    async def ack(self, delivery: Delivery, finishes: list[JobFinish] | None = None) -> bool:
        acked: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if finishes and self._write_finishes is None:
            raise RuntimeError("final records to write, but no writer for them")
        if not self._acks:  # else the acker was woken already, and flushes until empty
            self._wake.set()
        self._acks.append((delivery, acked, finishes, None))
        # Held (slot and lease) until the broker has the ack: a lease that lapsed while
        # the ack waited would hand a finished job to another worker.
        if not await acked:
            raise LeaseLost(f"{delivery!r} was not acked")
        return True

    def ack_later(self, delivery: Delivery, outcome: Outcome) -> None:
        """`ack` without waiting: ``on_acked(answered, refused)`` is called once the
        broker answered (the job's task has ended by then: no task wakes up per job). The
        caller keeps the delivery held (slot and lease) until then."""
        if not self._acks:
            self._wake.set()
        self._acks.append((delivery, None, outcome.finishes, outcome))

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> bool:
        await self._call(partial(self._broker.retry, delivery, body=body, delay=delay), "retry")
        return True

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> bool:
        await self._call(partial(self._broker.dead_letter, delivery, letter), "dead_letter")
        return True

    async def retry_foreign(self, delivery: Delivery, *, attempt: int, delay: float) -> bool:
        await self._call(partial(retry_body, self._broker, delivery, attempt, delay), "retry")
        return True

    async def release(self, deliveries: Sequence[Delivery], *, again: bool = True) -> bool:
        if again:
            await self._call(partial(self._broker.release, deliveries), "release")
        else:
            await self._broker.release(deliveries)
        return True

    async def _call(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """``call`` with `backoff`, forever: callers bound it with a cancel scope (shutdown
        cancels it); a settlement abandoned that way is redelivered by the broker later
        (at-least-once), never lost. Raises `OutcomeUnknown` for a `LeaseLost` that follows
        a failed call (see there)."""
        failed = False

        async def once() -> T:
            nonlocal failed
            try:
                return await call()
            except BrokerUnavailable:
                failed = True
                raise

        try:
            return await backoff(once, what=what, clock=self._clock, retry_on=(BrokerUnavailable,))
        except LeaseLost as exc:
            if failed:
                raise OutcomeUnknown(f"{what}: {exc}") from exc
            raise

    async def run_acks(self) -> None:
        """Flush acks as they come, until cancelled."""
        while True:
            if not self._acks:  # started again after a failed batch: flush what is left
                await self._wake.wait()
            self._wake.clear()
            await self.flush_acks()

    async def flush_acks(self) -> None:
        # One flush at a time: the last flush at shutdown must wait for a batch `run_acks`
        # is still retrying, not find the list empty and let that batch be cancelled.
        async with self._flushing:
            while self._acks:
                batch = self._acks[: self._max_batch]
                del self._acks[: self._max_batch]
                finishes = [f for _, _, fs, _ in batch if fs for f in fs]
                try:
                    if finishes:
                        assert self._write_finishes is not None
                        await self._write_finishes(finishes)
                    lost = await self._call(
                        partial(self._broker.ack, [entry[0] for entry in batch]), "ack"
                    )
                except BaseException as exc:
                    # Not known to be acked: each job sees the error (or the cancel), and
                    # counts as nothing; the broker redelivers it after its lease.
                    self._answer(batch, exc)
                    raise
                self._answer(batch, {id(d) for d in lost})

    def _answer(self, batch: list[_Pending], refused: set[int] | BaseException) -> None:
        # The acks made without waiting are answered together, in one call for the batch.
        later: list[Answered] = []
        for delivery, acked, _, outcome in batch:
            if acked is None:
                assert outcome is not None
                later.append((delivery, outcome))
            elif acked.done():
                pass
            elif isinstance(refused, asyncio.CancelledError):
                acked.cancel()
            elif isinstance(refused, BaseException):
                acked.set_exception(refused)
            else:
                acked.set_result(id(delivery) not in refused)
        if later:
            assert self.on_acked is not None
            try:
                self.on_acked(later, refused)
            except Exception:
                log.exception("internal error after acking %d jobs", len(later))

    @property
    def pending_acks(self) -> int:
        return len(self._acks)


class InlineCompleter:
    """The Lambda adapter's completer: each call at once and once (the invocation has a
    deadline; what fails is reported for redelivery). An ack is Lambda's to do: it deletes
    the records reported done when the function returns. A retry or deferral is published
    as a new message, a dead letter written, where the broker can (``publisher``,
    ``writer``); a release, or what it cannot do, is left to the queue to deliver again."""

    def __init__(self, publisher: Broker | None, writer: DeadLetterWriter | None) -> None:
        self._publisher = publisher
        self._writer = writer

    async def ack(self, delivery: Delivery, finishes: list[JobFinish] | None = None) -> bool:
        assert not finishes, "the Lambda adapter writes final records itself"
        return True

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> bool:
        if self._publisher is None:
            return False
        await self._publisher.publish(delivery.queue, [body], delay=delay)
        return True

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> bool:
        if self._writer is None:
            return False
        await self._writer.send_dead_letter(delivery.queue, delivery.body, letter)
        return True

    async def retry_foreign(self, delivery: Delivery, *, attempt: int, delay: float) -> bool:
        return False  # left to the platform to deliver again

    async def release(self, deliveries: Sequence[Delivery], *, again: bool = True) -> bool:
        return False
