"""One exception tree. ``Retry`` and ``Reject`` are signals a handler raises to steer settlement."""

from __future__ import annotations

import re

__all__ = [
    "AioworkersError",
    "BrokerUnavailable",
    "ConfigError",
    "DecodeError",
    "LeaseLost",
    "Reject",
    "Retry",
    "redact",
]


class AioworkersError(Exception):
    """Base of every error raised by aioworkers."""


class ConfigError(AioworkersError):
    """Bad configuration: raised at start-up with a message that says what to fix."""


class BrokerUnavailable(AioworkersError):
    """A transient broker failure (connection lost, timeout): back off and try again."""


class LeaseLost(AioworkersError):
    """The delivery is no longer ours (its lease expired and another worker may hold it)."""


class DecodeError(AioworkersError):
    """A message that can never run. ``reason`` is one of the closed set in ``REASONS``."""

    REASONS = frozenset(
        {"payload_too_large", "decode_error", "schema_error", "unknown_task", "bad_arguments"}
    )

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in self.REASONS, reason
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Retry(AioworkersError):
    """Raise in a handler to retry the job, after ``delay`` seconds or the task's backoff."""

    def __init__(self, delay: float | None = None) -> None:
        super().__init__(f"retry requested (delay={delay})")
        self.delay = delay


class Reject(AioworkersError):
    """Raise in a handler to dead-letter the job at once, without further retries."""

    def __init__(self, reason: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason


# Like urlsplit, the user info runs to the *last* "@" before the host's "/", "?" or "#", so
# a password with a raw "@" (which redis-py and yarl accept) is hidden whole.
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/?#@\s]*):[^/?#\s]*@")


def redact(text: str) -> str:
    """Hide passwords in URLs (``redis://u:secret@h`` -> ``redis://u:***@h``)."""
    return _USERINFO.sub(r"\g<scheme>\g<user>:***@", text)
