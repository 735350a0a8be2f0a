"""What a failed job leaves behind: its dead letter and its log line. Every text taken from
the message or the error is cut and escaped, so neither can be forged or flooded."""

from __future__ import annotations

import logging
import time
import traceback

from ..brokers.base import DeadLetter, Delivery
from ..envelope import Envelope, fingerprint
from ..errors import printable, redact
from .outcome import Outcome

log = logging.getLogger("aioworkers")

MAX_ERROR_CHARS = 2000
MAX_TRACEBACK_CHARS = 8000


def dead_letter_for(
    delivery: Delivery, outcome: Outcome, reason: str, *, dead_at: float | None = None
) -> DeadLetter:
    """The record of a dead job (the body itself is kept whole beside it, for replay);
    ``dead_at`` in epoch seconds (the settler passes its clock's; default: now)."""
    env = outcome.envelope
    error = outcome.error
    return DeadLetter(
        id=printable(env.id if env else delivery.message_id),
        task=printable(env.task) if env else None,
        reason=reason,
        error=describe(outcome),
        error_type=type(error).__name__ if error is not None else None,
        traceback=error_traceback(error),
        attempts=env.attempt if env else 1,
        dead_at=time.time() if dead_at is None else dead_at,
        queue=delivery.queue,
    )


def describe(outcome: Outcome) -> str | None:
    """``"Type: message"`` on one line (or the outcome's detail, when no error was raised):
    cut (an error may quote a whole message) before it is redacted, then escaped."""
    error = outcome.error
    if error is None:
        return printable(outcome.detail, MAX_ERROR_CHARS) if outcome.detail else None
    return printable(redact(f"{type(error).__name__}: {error}", MAX_ERROR_CHARS), None)


def error_traceback(error: BaseException | None) -> str | None:
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


def job_fields(delivery: Delivery, outcome: Outcome | None) -> dict[str, object]:
    """The facts of a job as log fields (``extra={"job": ...}``, for ``--log-format json``),
    the same in every log line about a job, from a worker or the Lambda adapter."""
    env: Envelope | None = outcome.envelope if outcome is not None else None
    error = outcome.error if outcome is not None else None
    return {
        # Taken from the message: cut and escaped.
        "job_id": printable(env.id if env is not None else delivery.message_id),
        "task": printable(env.task) if env is not None else None,
        "attempt": env.attempt if env is not None else None,
        "queue": delivery.queue,
        "duration": round(outcome.duration, 6) if outcome is not None else 0.0,
        "error": describe(outcome) if outcome is not None else None,
        "error_type": type(error).__name__ if error is not None else None,
    }


def log_failure(
    level: int, delivery: Delivery, outcome: Outcome, what: str, counted_as: str
) -> None:
    job = job_fields(delivery, outcome)
    job["outcome"] = counted_as
    job["detail"] = what
    env = outcome.envelope
    if env is None:
        # Never log the body of a message we could not read: size and hash identify it.
        log.log(
            level,
            "job failed id=%s size=%d hash=%s error=%r outcome=%s",
            job["job_id"],
            len(delivery.body),
            fingerprint(delivery.body),
            job["error"],
            what,
            extra={"job": job},
        )
        return
    log.log(
        level,
        "job failed id=%s task=%s attempt=%d queue=%s duration=%.3fs error=%r outcome=%s",
        job["job_id"],
        job["task"],
        env.attempt,
        delivery.queue,
        outcome.duration,
        job["error"],
        what,
        extra={"job": job},
    )
