"""The queues of the RabbitMQ broker, all durable and declared on first use: ``<queue>``
(the jobs; classic, or quorum with ``queue_type=quorum``), ``<queue>.dead`` (the DLQ, same
type) and, lazily, one delay queue per delay (see the `AmqpBroker` module docstring)."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from aiormq import exceptions as mqexc
from pamqp import commands as spec

from ..errors import ConfigError
from ._amqp_connections import Connections
from ._amqp_errors import RPC_TIMEOUT, io
from ._amqp_messages import text

log = logging.getLogger("aioworkers")

DELAY_EXPIRES_MS = 600_000  # a delay queue unused this long (beyond its TTL) is deleted
REDECLARE_AFTER = 300.0  # redeclare a delay queue before publishing if older than this
QUORUM_DELAYS_SINCE = (3, 10)  # message TTL and at-least-once dead-lettering on quorum queues
_QUORUM_DELAY = {
    "x-queue-type": "quorum",
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",  # required by at-least-once; there is no length limit
}


def bucket(delay: float) -> int:
    """Delay in ms, rounded to two significant digits: a bounded number of delay queues."""
    ms = max(1, round(delay * 1000))
    if ms < 100:
        return ms
    unit = 10 ** (len(str(ms)) - 2)
    return int(round(ms / unit) * unit)


def refused(name: str, arguments: dict[str, Any], reason: str) -> str:
    """What to fix when RabbitMQ refuses to declare queue ``name`` (PRECONDITION_FAILED)."""
    if "inequivalent arg" not in reason:
        return f"amqp: RabbitMQ refused queue {name!r} with arguments {arguments}: {reason}"
    # A delay queue is declared again on its next use; the others hold jobs.
    fix = "" if "x-message-ttl" in arguments else " or set queue_type= to match it"
    return (
        f"amqp: queue {name!r} already exists with other arguments than "
        f"{arguments or 'none (a classic queue)'}: delete it "
        f"(rabbitmqctl delete_queue {name}){fix} ({reason})"
    )


class Topology:
    """Declares queues once per process (delay queues again now and then), and counts."""

    def __init__(self, connections: Connections, *, queue_type: str, delays: str | None) -> None:
        self._connections = connections
        self.queue_type = queue_type
        self._delay_option = delays
        self._delay_type = delays if delays == "classic" else None
        self._declared: set[str] = set()
        self.delays: dict[str, dict[str, float]] = {}  # queue -> delay queue -> declared at
        self.known_queues: set[str] = set()  # every queue this broker declared

    def forget(self, queue: str | None = None) -> None:
        """Declare ``queue`` (or, for None, every queue) again on next use: it may be gone."""
        if queue is None:
            self._declared.clear()
            self.delays.clear()
        else:
            self._declared.discard(queue)

    def arguments(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}

    async def declare(self, name: str, arguments: dict[str, Any]) -> spec.Queue.DeclareOk:
        ch = await self._connections.controlling()
        try:
            async with io(f"declare {name!r}", RPC_TIMEOUT):
                try:
                    ok = await ch.queue_declare(name, durable=True, arguments=arguments)
                except mqexc.ChannelPreconditionFailed as exc:
                    reason = text(exc.args[0] if exc.args else exc) or ""
                    raise ConfigError(refused(name, arguments, reason)) from None
        finally:
            if ch.is_closed:
                self._connections.control = None
        self.known_queues.add(name)
        return ok

    async def ensure(self, queue: str) -> None:
        if queue in self._declared:
            return
        await self.declare(queue, self.arguments())
        await self.declare(f"{queue}.dead", self.arguments())
        self._declared.add(queue)

    async def route(self, queue: str, delay: float) -> str:
        """The routing key of a message for ``queue`` published with ``delay``."""
        await self.ensure(queue)
        return await self._delay_queue(queue, delay) if delay > 0 else queue

    async def _delay_queue(self, queue: str, delay: float) -> str:
        ms = bucket(delay)
        quorum = await self._delays_type() == "quorum"
        # Named apart: an existing queue's arguments can't change, and a classic delay
        # queue of an older version may still be there (it drains and expires on its own).
        name = f"{queue}.delay.{ms}.quorum" if quorum else f"{queue}.delay.{ms}"
        known = self.delays.setdefault(queue, {})
        # Redeclared now and then: a declare restarts the x-expires clock, a publish doesn't.
        if time.monotonic() - known.get(name, -REDECLARE_AFTER) >= REDECLARE_AFTER:
            arguments: dict[str, Any] = {
                "x-message-ttl": ms,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queue,
                "x-expires": ms + DELAY_EXPIRES_MS,
            }
            await self.declare(name, arguments | _QUORUM_DELAY if quorum else arguments)
            known[name] = time.monotonic()
        return name

    async def _delays_type(self) -> str:
        """``quorum`` where RabbitMQ can (3.10+): an expired message is dead-lettered back
        at least once, kept until its queue confirms it; a classic queue drops it if the
        queue refuses it then (full, or unavailable)."""
        if self._delay_type is None:
            conn = await self._connections.main()
            version = str(conn.server_properties.get("version") or "")
            found = re.match(r"(\d+)\.(\d+)", version)
            if found is None or (int(found[1]), int(found[2])) >= QUORUM_DELAYS_SINCE:
                self._delay_type = "quorum"
            elif self._delay_option == "quorum":
                raise ConfigError(
                    f"amqp: delay_queues=quorum needs RabbitMQ 3.10 or later, this is "
                    f"{version}: upgrade it, or set delay_queues=classic"
                )
            else:
                log.warning(
                    "RabbitMQ %s is older than 3.10: delayed jobs and retries go through "
                    "classic queues, which dead-letter them back at most once",
                    version[:40],
                )
                self._delay_type = "classic"
        return self._delay_type

    async def count(self, name: str) -> tuple[int, int]:
        """(ready messages, consumers) of a queue; (0, 0) if it does not exist."""
        probe = await self._connections.probing()
        async with io(f"count {name!r}", RPC_TIMEOUT):
            try:
                ok = await probe.queue_declare(name, passive=True)
            except mqexc.ChannelNotFoundEntity:
                self._connections.probe = None
                return 0, 0
        return int(ok.message_count or 0), int(ok.consumer_count or 0)
