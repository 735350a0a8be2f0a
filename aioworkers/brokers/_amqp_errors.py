"""RabbitMQ client errors, mapped by one table (`RULES`) at the I/O boundary (`io`, on the
kit's `map_exceptions`), where every call also gets a deadline by purpose."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiormq import exceptions as mqexc

from ..errors import AioworkersError, BrokerUnavailable, ConfigError, redact
from ._kit import map_exceptions

# Deadlines, by purpose. Every call to RabbitMQ has one; running out is BrokerUnavailable.
CONNECT_TIMEOUT = 10.0  # TCP, TLS and the AMQP handshake; opening a channel
RPC_TIMEOUT = 10.0  # a method RabbitMQ answers at once unless in trouble (declare, consume)
PUBLISH_TIMEOUT = 10.0  # default ``publish_timeout``: one publish call, confirms included
HAND_BACK_TIMEOUT = 2.0  # a shutdown's republish of unstarted jobs (else: nacked back)
SETTLE_TIMEOUT = 5.0  # acks and nacks written to the socket
CLOSE_TIMEOUT = 5.0  # a connection's close handshake

# Client errors -> ours, first match wins: (types, text the error or its cause must hold,
# our error, what to fix). ConfigError for refusals that retrying can't cure; everything
# else the client raises is transient: BrokerUnavailable, back off and try again.
Rule = tuple[type[BaseException] | tuple[type[BaseException], ...], str, type[AioworkersError], str]
RULES: tuple[Rule, ...] = (
    (
        ssl.SSLCertVerificationError,
        "",
        ConfigError,
        "the server's TLS certificate is not trusted: fix it, or give its CA as cafile=",
    ),
    (
        (mqexc.ProbableAuthenticationError, mqexc.AuthenticationError),
        "",
        ConfigError,
        "RabbitMQ refused the login: check the user and password in the URL",
    ),
    (
        mqexc.ChannelAccessRefused,
        "",
        ConfigError,
        "RabbitMQ refused the user this: grant it configure, write and read permissions "
        "on these queues (rabbitmqctl set_permissions)",
    ),
    # Transient, with a hint: the first also comes from a proxy whose RabbitMQ is down,
    # the second from a connection limit as well as from a missing vhost.
    (
        mqexc.IncompatibleProtocolError,
        "",
        BrokerUnavailable,
        "no AMQP handshake (is this RabbitMQ's port?)",
    ),
    (
        mqexc.InvalidFrameError,
        "Connection.OpenOk",
        BrokerUnavailable,
        "RabbitMQ refused to open the vhost (does it exist, may the user use it, "
        "is a connection limit reached?)",
    ),
    ((mqexc.AMQPError, mqexc.ChannelInvalidStateError, OSError), "", BrokerUnavailable, ""),
    (RuntimeError, "closed", BrokerUnavailable, ""),
)


def detail(exc: BaseException) -> str:
    text = " ".join(str(a) for a in exc.args) if exc.args else ""
    return f"{type(exc).__name__}: {redact(text)[:300]}" if text else type(exc).__name__


def map_error(what: str, exc: BaseException) -> AioworkersError | None:
    """Our error for a client error ``exc`` (by `RULES`), or None to let it through."""
    if isinstance(exc, AioworkersError):
        return None
    for types, marker, kind, fix in RULES:
        for candidate in (exc, exc.__cause__):
            if isinstance(candidate, types) and marker in str(candidate):
                shown = detail(exc)
                return kind(f"amqp: {what}: {fix} ({shown})" if fix else f"amqp: {what}: {shown}")
    return None


@asynccontextmanager
async def io(what: str, seconds: float) -> AsyncIterator[None]:
    """The I/O boundary: ``what`` gets ``seconds``, and client errors are mapped."""
    deadline = asyncio.timeout(seconds)

    def mapped(exc: BaseException) -> BaseException | None:
        if isinstance(exc, TimeoutError) and deadline.expired():
            return BrokerUnavailable(f"amqp: {what}: timed out after {seconds:g}s")
        return map_error(what, exc)

    with map_exceptions({Exception: mapped}):
        async with deadline:
            yield
