"""SQS client errors, mapped by one table at the I/O boundary (`mapped`, on the kit's
`map_exceptions`): transient -> `BrokerUnavailable`; set-up -> `ConfigError` with what to
fix; a message SQS refuses for what it holds -> `MessageRefusedError`."""

from __future__ import annotations

from botocore import exceptions as bexc  # type: ignore[import-untyped]

from ..errors import AioworkersError, BrokerUnavailable, ConfigError, redact
from ._kit import map_exceptions


class MessageRefusedError(AioworkersError, ValueError):
    """SQS refuses a message for what it holds (too large, characters it does not take):
    permanent, sending it again fails the same way."""


TRANSIENT, CONFIG, REFUSED = "transient", "config", "refused"

# What an SQS error code means here (the "AWS.SimpleQueueService." prefix removed). A code
# not listed is TRANSIENT in a 5xx reply or when it speaks of throttling, CONFIG otherwise:
# credentials, permissions, a missing queue, KMS, a bad parameter at start-up.
_CODES: dict[str, str] = {
    **dict.fromkeys(
        (
            "ThrottlingException",
            "Throttling",
            "RequestThrottled",
            "RequestThrottledException",
            "ServiceUnavailable",
            "InternalError",
            "InternalFailure",
            "KmsThrottled",
            "SlowDown",
            "RequestTimeout",
            "RequestTimeoutException",
            "OverLimit",  # too many messages in flight: some settle soon
            "QueueDeletedRecently",  # create again after 60 s
        ),
        TRANSIENT,
    ),
    # What one message holds: `MessageRefusedError` for a send, `ConfigError` elsewhere.
    **dict.fromkeys(
        (
            "InvalidMessageContents",
            "MessageTooLong",
            "BatchRequestTooLong",
            "InvalidParameterValue",
            "InvalidAttributeValue",
        ),
        REFUSED,
    ),
}

_PERMISSIONS = (
    "the AWS credentials in use lack a permission on this queue: aioworkers needs "
    "sqs:GetQueueUrl, GetQueueAttributes, SendMessage, ReceiveMessage, DeleteMessage, "
    "ChangeMessageVisibility, and CreateQueue unless create=0"
)
_KEYS = "the AWS credentials in use are not valid (environment, profile or role): check them"
# What to fix, for the errors a user meets at start-up (AWS's own text otherwise: auth
# failures get only this, their text may quote the request).
_HINTS: dict[str, str] = {
    "AccessDenied": _PERMISSIONS,
    "AccessDeniedException": _PERMISSIONS,
    "InvalidClientTokenId": _KEYS,
    "UnrecognizedClientException": _KEYS,
    "SignatureDoesNotMatch": _KEYS,
    "IncompleteSignature": _KEYS,
    "InvalidSecurity": _KEYS,
    "MissingAuthenticationToken": _KEYS,
    "ExpiredToken": "the AWS session token has expired: refresh the credentials",
    "NonExistentQueue": "the queue does not exist: create it, or use create=1",
    "QueueDoesNotExist": "the queue does not exist: create it, or use create=1",
    "credentials": (
        "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a "
        "profile (AWS_PROFILE, or profile= in the URL), or give the process an instance or "
        "task role"
    ),
}

# botocore's other errors, by class (first match wins).
_TYPES: tuple[tuple[type[Exception], str], ...] = (
    # An instance or task metadata service, or a credential process, failed this time.
    (bexc.CredentialRetrievalError, TRANSIENT),
    (bexc.MetadataRetrievalError, TRANSIENT),
    (bexc.PartialCredentialsError, CONFIG),
    (bexc.UnknownCredentialError, CONFIG),
    (bexc.NoRegionError, CONFIG),
    (bexc.ProfileNotFound, CONFIG),
    (bexc.InvalidConfigError, CONFIG),
    (bexc.ConnectionError, TRANSIENT),  # endpoint unreachable, connect timeout, proxy
    (bexc.HTTPClientError, TRANSIENT),  # read timeout, connection closed
    (OSError, TRANSIENT),
)


def map_error(
    exc: BaseException, what: str, *, started: bool = True, message: bool = False
) -> AioworkersError | None:
    """Our error for a client error raised during ``what`` (None: not a client error).

    ``started``: the broker has talked to SQS before, so missing credentials are a lapse
    of an instance role, not a set-up without any. ``message``: the call sends messages,
    so a refusal concerns what they hold."""
    kind, detail = _classify(exc, started)
    if kind == TRANSIENT:
        return BrokerUnavailable(f"sqs {what}: {detail}")
    if kind == REFUSED and message:
        return MessageRefusedError(f"sqs {what}: {detail}")
    if kind is not None:
        return ConfigError(f"sqs {what}: {detail}")
    return None


def _classify(exc: BaseException, started: bool) -> tuple[str | None, str]:
    if isinstance(exc, bexc.ClientError):
        code = error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        kind = _CODES.get(code)
        if kind is None:
            server = isinstance(status, int) and status >= 500
            kind = TRANSIENT if server or "Throttl" in code or "Unavailable" in code else CONFIG
        text = _HINTS.get(code) or redact(str(exc.response.get("Error", {}).get("Message", "")))
        return kind, f"{code}: {text[:300]}" if text else code
    if isinstance(exc, bexc.NoCredentialsError):
        if started:
            return TRANSIENT, "no AWS credentials at the moment (NoCredentialsError)"
        return CONFIG, _HINTS["credentials"]
    for cls, kind in _TYPES:
        if isinstance(exc, cls):
            return kind, f"{type(exc).__name__}: {redact(str(exc))[:300]}"
    return None, ""


def mapped(what: str, *, started: bool = True, message: bool = False) -> map_exceptions:
    """Client errors raised in the block become ours (see `map_error`): the I/O boundary."""

    def mapper(exc: BaseException) -> BaseException | None:
        return map_error(exc, what, started=started, message=message)

    return map_exceptions({Exception: mapper})


def error_code(exc: bexc.ClientError) -> str:
    """The SQS error code of a client error, without the ``AWS.SimpleQueueService.`` prefix."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code.removeprefix("AWS.SimpleQueueService.")
