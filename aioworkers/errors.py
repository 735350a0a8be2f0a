"""One exception tree. ``Retry`` and ``Reject`` are signals a handler raises to steer settlement."""

from __future__ import annotations

import functools
import math
import numbers
import re
from urllib.parse import unquote_plus

__all__ = [
    "AioworkersError",
    "BrokerUnavailable",
    "ConfigError",
    "DecodeError",
    "JobCancelled",
    "JobFailed",
    "LeaseLost",
    "Reject",
    "ResultUnavailable",
    "Retry",
    "Snooze",
    "clip",
    "printable",
    "redact",
    "redact_url",
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


def check_delay(value: float | None, what: str = "delay") -> float:
    """``value`` seconds as a delay: None is no delay; negative, NaN or infinite is a
    `ConfigError` naming ``what``."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} must be a number of seconds or None, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"{what} must be a finite number of seconds >= 0 (or None: no delay), got {value!r}"
        )
    return float(value)


class Retry(AioworkersError):
    """Raise in a handler to retry the job, after ``delay`` seconds or the task's backoff."""

    def __init__(self, delay: float | None = None) -> None:
        if delay is not None:  # None: the task's backoff; else a ConfigError if not >= 0
            delay = check_delay(delay, "Retry(delay=)")
        super().__init__(f"retry requested (delay={delay})")
        self.delay = delay


class Reject(AioworkersError):
    """Raise in a handler to dead-letter the job at once, without further retries."""

    def __init__(self, reason: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason


class Snooze(AioworkersError):
    """Raise in a handler for "not yet": the job runs again after ``delay`` seconds with
    the same attempt (no retry is used). `current_job().snoozes` counts them; past the
    task's ``max_snoozes`` the job is dead-lettered with reason ``max_snoozes``."""

    def __init__(self, delay: float | None) -> None:
        delay = check_delay(delay, "Snooze(delay=)")  # None: at once
        super().__init__(f"snoozed for {delay}s")
        self.delay = delay


class RateLimited(AioworkersError):
    """Raise in a handler when a dependency said "too many requests": the job runs again
    after ``retry_after`` seconds with the same attempt (no retry is used), and a task
    with ``rate_limit`` pauses its key (or the task) for that long on every worker."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limited for {retry_after}s")
        self.retry_after = retry_after


class JobFailed(AioworkersError):
    """`JobHandle.result`: the job was dead-lettered (its retries spent, rejected, or a
    message that cannot run); ``error_type``, ``error`` and ``traceback`` of its last try."""

    def __init__(self, job_id: str, error_type: str, error: str, traceback: str = "") -> None:
        super().__init__(f"job {job_id} failed: {error_type}: {error}")
        self.job_id = job_id
        self.error_type = error_type
        self.error = error
        self.traceback = traceback


class JobCancelled(AioworkersError):
    """`JobHandle.result`: the job was cancelled."""


class ResultUnavailable(AioworkersError):
    """`JobHandle.result`: there is no result to wait for: the task keeps none
    (``result_ttl``), the id is unknown, the record expired, or the return value could not
    be stored (``reason`` says which)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- text taken from messages, errors and URLs ------------------------------------------------
#
# Everything here is linear in the length of its input: a message can carry megabytes, and
# a pattern that backtracks on it freezes the event loop (and with it every lease). Each
# pattern starts only at the first character of a run (a lookbehind refuses the rest) and
# consumes runs possessively, so no character is scanned more than a few times.

MAX_FIELD_CHARS = 200  # an id, task name or key from a message, in a log line or a DLQ record

# User info, as urlsplit (and so redis-py and yarl) reads it: up to the *last* "@" before
# the host's "/", "?" or "#", so a password with a raw "@" is hidden whole.
_USERINFO = re.compile(r"(?<![a-zA-Z0-9+.-])([a-zA-Z0-9+.-]++://)([^:/?#@\s]*+):(?:[^/?#@\s]*+@)++")
# The same, with its "@" cut off at the end of a cut text: hide what follows the colon.
_DANGLING_USERINFO = re.compile(
    r"(?<![a-zA-Z0-9+.-])([a-zA-Z0-9+.-]++://[^:/?#@\s]*+):[^/?#@\s]*+\Z"
)
# ``name=`` in a query string, a DSN or a log line, if the name holds a hint of a secret
# (the lookahead reads only the name); whether it names one is decided in Python
# (`_secret_name`), after percent-decoding as the clients do.
_PARAM = re.compile(
    r"(?<![\w%.+-])(?=[\w%.+-]*?(?i:pass|pwd|secret|token|credential|sig|key|%))([\w%.+-]++)="
)
_VALUE_END = re.compile(r"[&\s]")
_SPACE = re.compile(r"\s")
_NOT_ALNUM = re.compile(r"[\W_]+")
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*+")
_NETLOC_END = re.compile(r"[/?#]")

# Parameter names, lowercased with punctuation removed, that hold a secret: redis-py's
# password and ssl_password (it passes any query parameter to the connection), AWS keys
# and session tokens, presigned-URL credentials and signatures, API keys.
_SECRET_WORDS = (
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "secret",
    "token",
    "credential",
    "signature",
    "accesskey",
    "apikey",
    "privatekey",
)
_SECRET_NAMES = frozenset({"pass", "key", "sig"})
# (`_PARAM` matches only names with a part of one of these in them, or a percent sign.)


@functools.lru_cache(maxsize=256)  # names repeat (in a text, and from line to line)
def _secret_name(name: str) -> bool:
    plain = _NOT_ALNUM.sub("", unquote_plus(name).lower())
    return plain in _SECRET_NAMES or any(word in plain for word in _SECRET_WORDS)


def _hide_params(text: str) -> str:
    out: list[str] = []
    done = 0  # text[:done] is copied or hidden already
    for m in _PARAM.finditer(text):
        if m.start() < done or not _secret_name(m.group(1)):
            continue
        end = _VALUE_END.search(text, m.end())
        stop = end.start() if end is not None else len(text)
        if stop > m.end():
            out += (text[done : m.end()], "***")
            done = stop
    out.append(text[done:])
    return "".join(out)


def _redact(text: str) -> str:
    return _hide_params(_USERINFO.sub(r"\1\2:***@", text))


def clip(text: str, limit: int) -> str:
    """At most ``limit`` characters of ``text``, and a note of how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[+{len(text) - limit} chars]"


def printable(text: str, limit: int | None = MAX_FIELD_CHARS) -> str:
    """A field taken from a message, fit for one log line or a DLQ record: cut to
    ``limit`` characters (``None``: not cut), then every non-printable character escaped
    as in a repr (``\\n``, ``\\x1b``, ``\\u2028``), so it can neither forge a line nor
    drive a terminal."""
    if limit is not None:
        text = clip(text, limit)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def redact(text: str, limit: int | None = None, *, keep_end: bool = False) -> str:
    """Hide credentials: URL passwords (``redis://u:secret@h`` -> ``redis://u:***@h``) and
    the values of parameters named like one (``?password=``, ``pass=``, ``pass%77ord=``,
    ``aws_secret_access_key=``, ``aws_session_token=``, ``token=``, ``key=``, ...).

    Linear-time. With ``limit``, ``text`` is cut to its first (or, with ``keep_end``, its
    last) ``limit`` characters *before* anything else reads it, and a credential the cut
    split is hidden or dropped whole, never shown in part.
    """
    if limit is None or len(text) <= limit:
        return _redact(text)
    cut = len(text) - limit
    if not keep_end:
        head = _DANGLING_USERINFO.sub(r"\1:***", _redact(text[:limit]))
        return f"{head}...[+{cut} chars]"
    tail = text[cut:]
    if not text[cut - 1].isspace():
        # The cut fell inside a word, maybe a URL or "name=value": drop the rest of it.
        space = _SPACE.search(tail)
        tail = tail[space.start() :] if space is not None else ""
    return f"[+{cut} chars]...{_redact(tail)}"


def redact_url(url: str) -> str:
    """A URL fit to show (`App.broker_name`): read as the clients read it (the user info
    up to the last "@" of the network location, query parameters split on "&" and their
    names percent-decoded), with the password and every secret parameter hidden."""
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return redact(url)
    found = _NETLOC_END.search(rest)
    end = found.start() if found is not None else len(rest)
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    tail, hash_, fragment = tail.partition("#")
    path, question, query = tail.partition("?")
    if question:
        params = (p.partition("=") for p in query.split("&"))
        query = "&".join(
            f"{k}=***" if eq and v and _secret_name(k) else f"{k}{eq}{v}" for k, eq, v in params
        )
    return redact(f"{scheme}://{netloc}{path}{question}{query}{hash_}{fragment}")
