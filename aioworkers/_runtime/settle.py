"""Settle each delivery exactly once: the only caller of ack, retry, release and dead_letter."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio

from ..brokers.base import Broker, DeadLetter, Delivery
from ..envelope import Envelope, encode, fingerprint
from ..errors import BrokerUnavailable, LeaseLost, printable, redact
from ..task import Policy
from ..telemetry.worker import WorkerTelemetry
from . import classify as c
from .executor import Outcome

log = logging.getLogger("aioworkers")

DEFAULT_POLICY = Policy()
MAX_ERROR_CHARS = 2000
MAX_TRACEBACK_CHARS = 8000


class OutcomeUnknown(Exception):
    """A settle call failed with `BrokerUnavailable`, whose result is unknown (the broker
    may have applied it and the reply been lost), and the broker refused the re-send as
    `LeaseLost`: either the first call was applied, or the lease was lost meanwhile.

    A broker that recognises the re-send of a call it applied answers it as done (the
    memory broker, by the delivery's lease token), so this is raised only where the broker
    cannot tell (Redis); it is then counted as neither outcome.
    """


async def with_backoff(call: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Retry ``call`` on `BrokerUnavailable` with capped exponential backoff, forever.

    Callers bound it with a cancel scope (shutdown cancels it); a settlement abandoned that
    way is redelivered by the broker later (at-least-once), never lost. Raises
    `OutcomeUnknown` for a `LeaseLost` that follows a failed call (see there).
    """
    delay = 0.05
    unsure = False
    while True:
        try:
            return await call()
        except BrokerUnavailable as exc:
            unsure = True
            log.warning("broker unavailable during %s, retrying in %.2fs: %s", what, delay, exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)
        except LeaseLost as exc:
            if unsure:
                raise OutcomeUnknown(f"{what}: {exc}") from exc
            raise


class Settler:
    """Turns outcomes into broker calls. Acks are batched: every ack that arrives while a
    round trip is in progress goes out together in the next one, and each job waits for
    its own to be confirmed."""

    def __init__(
        self,
        broker: Broker,
        *,
        max_ack_batch: int = 1000,
        telemetry: WorkerTelemetry | None = None,
    ) -> None:
        self._broker = broker
        self._telemetry = telemetry
        # Each ack's future says whether the broker took it (False: the lease was lost).
        self._acks: list[tuple[Delivery, asyncio.Future[bool]]] = []
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._max_batch = max_ack_batch
        self.counts: Counter[str] = Counter()

    def count(self, name: str, delivery: Delivery, outcome: Outcome | None = None) -> None:
        """The one place a delivery is counted as an outcome (``ok``, ``retried``, ...):
        `counts`, and the metrics and span of the job when telemetry is on."""
        self.counts[name] += 1
        if self._telemetry is not None:
            self._telemetry.settled(name, delivery, outcome)

    async def settle(self, delivery: Delivery, outcome: Outcome) -> c.Decision:
        env = outcome.envelope
        policy = outcome.task.policy if outcome.task is not None else DEFAULT_POLICY
        decision = c.classify(outcome.error, env.attempt if env else 1, policy)
        try:
            await self._apply(delivery, outcome, decision)
        except OutcomeUnknown as exc:
            # Counted as neither: "lease_lost" would be false if the first call was applied.
            log.warning(
                "outcome of %r unknown: applied with its reply lost, or its lease was lost "
                "meanwhile (counted as neither): %s",
                delivery,
                exc,
            )
        except LeaseLost:
            self.count("lease_lost", delivery, outcome)
            log.warning("lease lost, not settling %r (another worker owns it now)", delivery)
        return decision

    async def _apply(self, delivery: Delivery, outcome: Outcome, decision: c.Decision) -> None:
        broker = self._broker
        match decision:
            case c.Ack(outcome=counted_as):
                acked: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
                self._acks.append((delivery, acked))
                self._wake.set()
                # Held (slot and lease) until the broker has the ack: a lease that lapsed
                # while the ack waited would hand a finished job to another worker.
                if not await acked:
                    raise LeaseLost(f"{delivery!r} was not acked")
                self.count(counted_as, delivery, outcome)
            case c.RetryLater(delay=delay):
                assert outcome.envelope is not None
                body = encode(outcome.envelope.next_attempt())
                _log_failure(
                    logging.WARNING, delivery, outcome, f"retry in {delay:.2f}s", "retried"
                )
                await with_backoff(lambda: broker.retry(delivery, body=body, delay=delay), "retry")
                # Counted once done: a delivery whose lease was lost counts as lease_lost only.
                self.count("retried", delivery, outcome)
            case c.DeadLetter(reason=reason):
                letter = dead_letter_for(delivery, outcome, reason)
                _log_failure(logging.ERROR, delivery, outcome, f"dead-lettered ({reason})", "dead")
                await with_backoff(lambda: broker.dead_letter(delivery, letter), "dead_letter")
                self.count("dead", delivery, outcome)
            case c.Release():
                await with_backoff(lambda: broker.release([delivery]), "release")
                self.count("released", delivery, outcome)
            case c.Defer(delay=delay):
                # The body unchanged: same attempt, so waiting on a key uses no retry.
                env = outcome.envelope
                job_id = env.id if env is not None else delivery.message_id
                why = printable(str(outcome.error), MAX_ERROR_CHARS)
                log.info("job deferred id=%s for %.2fs: %s", printable(job_id), delay, why)
                await with_backoff(
                    lambda: broker.retry(delivery, body=delivery.body, delay=delay), "retry"
                )
                self.count("deferred", delivery, outcome)

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
                try:
                    lost = await with_backoff(
                        partial(self._broker.ack, [d for d, _ in batch]), "ack"
                    )
                except BaseException as exc:
                    # Not known to be acked: each job sees the error (or the cancel), and
                    # counts as nothing; the broker redelivers it after its lease.
                    for _, acked in batch:
                        if not acked.done():
                            if isinstance(exc, asyncio.CancelledError):
                                acked.cancel()
                            else:
                                acked.set_exception(exc)
                    raise
                refused = {id(d) for d in lost or ()}  # an older Broker returns None
                for d, acked in batch:
                    if not acked.done():
                        acked.set_result(id(d) not in refused)

    @property
    def pending_acks(self) -> int:
        return len(self._acks)


def dead_letter_for(delivery: Delivery, outcome: Outcome, reason: str) -> DeadLetter:
    """The record of a dead job: every text in it taken from the message or the error is
    cut and escaped (the body itself is kept whole beside it, for replay)."""
    env = outcome.envelope
    error = outcome.error
    return DeadLetter(
        id=printable(env.id if env else delivery.message_id),
        task=printable(env.task) if env else None,
        reason=reason,
        error=_describe(error),
        error_type=type(error).__name__ if error is not None else None,
        traceback=_traceback(error),
        attempts=env.attempt if env else 1,
        dead_at=time.time(),
        queue=delivery.queue,
    )


def _describe(error: BaseException | None) -> str | None:
    """``"Type: message"`` on one line: cut (an error may quote a whole message) before
    it is redacted, then escaped."""
    if error is None:
        return None
    return printable(redact(f"{type(error).__name__}: {error}", MAX_ERROR_CHARS), None)


def _traceback(error: BaseException | None) -> str | None:
    """The traceback's last lines, redacted. Each part (a frame, an exception's message)
    is cut on its own first, so a huge message cannot push the frames out."""
    if error is None or error.__traceback__ is None:
        return None
    parts = traceback.TracebackException.from_exception(error).format()
    text = "".join(_cut_part(part) for part in parts)
    lines = redact(text, MAX_TRACEBACK_CHARS, keep_end=True).split("\n")
    return "\n".join(printable(line, None) for line in lines)


def _cut_part(part: str) -> str:
    if len(part) <= MAX_ERROR_CHARS:
        return part
    return redact(part, MAX_ERROR_CHARS) + "\n"


def _log_failure(
    level: int, delivery: Delivery, outcome: Outcome, what: str, counted_as: str
) -> None:
    env: Envelope | None = outcome.envelope
    error = _describe(outcome.error)
    # Taken from the message: cut and escaped, so a log line can be neither forged nor flooded.
    job_id = printable(env.id if env is not None else delivery.message_id)
    task = printable(env.task) if env is not None else None
    # The same facts as fields, for `--log-format json` (see aioworkers.monitor).
    job = {
        "job_id": job_id,
        "task": task,
        "attempt": env.attempt if env is not None else None,
        "queue": delivery.queue,
        "duration": round(outcome.duration, 6),
        "error": error,
        "error_type": type(outcome.error).__name__ if outcome.error is not None else None,
        "outcome": counted_as,
        "detail": what,
    }
    if env is None:
        # Never log the body of a message we could not read: size and hash identify it.
        log.log(
            level,
            "job failed id=%s size=%d hash=%s error=%r outcome=%s",
            job_id,
            len(delivery.body),
            fingerprint(delivery.body),
            error,
            what,
            extra={"job": job},
        )
        return
    log.log(
        level,
        "job failed id=%s task=%s attempt=%d queue=%s duration=%.3fs error=%r outcome=%s",
        job_id,
        task,
        env.attempt,
        delivery.queue,
        outcome.duration,
        error,
        what,
        extra={"job": job},
    )
