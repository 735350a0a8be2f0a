"""Which SQS deliveries are this process's: SQS lets a lease lapse by itself and may
accept an outdated receipt handle, so the broker keeps its own view (see `SqsBroker`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._runtime.clock import SYSTEM_CLOCK, Clock
from ..errors import LeaseLost
from ._kit import LeaseTable
from ._sqs_queues import SqsQueues
from ._sqs_wire import BASE, ENC, _attr
from .base import Delivery, handed_back

log = logging.getLogger("aioworkers")


@dataclass(eq=False, slots=True)
class Lease:
    """The token of an SQS delivery: the receipt handle and this process's view of it."""

    receipt: str
    receive_count: int
    key: tuple[str, str] = ("", "")  # (queue, message id)
    # On the lease table's clock: its deadline there, kept here too so that the check of a
    # delivery in hand reads it from the delivery (a lease made to lapse lapses at once).
    deadline: float = 0.0
    base: int = 0
    eta: int | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    copied: bool = False  # its retry, hand-back or dead letter is sent; the delete is left
    settled: bool = False  # acked, retried, released or dead-lettered by us


class Leases:
    """The leases this process holds, in the kit's `LeaseTable`: a lease runs from when the
    receive or extend that took it was *sent*; lapsed ones are collected before every
    check, so a lapsed lease is never taken for a held one. A later receive of the same
    message makes the older delivery no longer ours."""

    def __init__(self, queues: SqsQueues, clock: Clock = SYSTEM_CLOCK) -> None:
        self._queues = queues
        self.clock = clock
        self._table: LeaseTable[Lease] = LeaseTable(clock)
        self._current: dict[tuple[str, str], Lease] = {}

    def _collect(self) -> None:
        for lease in self._table.expired():
            if self._current.get(lease.key) is lease:
                del self._current[lease.key]

    def hold(self, lease: Lease, seconds: float, *, start: float) -> bool:
        """Hold ``lease`` for ``seconds`` from ``start``; False if this process holds the
        same message already (moto hands one message to two receives; real SQS never)."""
        self._collect()
        current = self._current.get(lease.key)
        if current is not None and self._table.owns(current):
            return False
        self._current[lease.key] = lease
        lease.deadline = self._table.add(lease, seconds, start=start)
        return True

    def owned(self, d: Delivery) -> bool:
        lease = d.token
        if not isinstance(lease, Lease):
            return False
        self._collect()
        return (
            self._table.owns(lease)
            and self._current.get(lease.key) is lease
            and self.clock.monotonic() < lease.deadline
        )

    def claim(self, d: Delivery, what: str) -> Lease:
        """The lease of ``d`` if it is still ours, else `LeaseLost`."""
        if self.owned(d):
            return lease_of(d)
        if half_done(d):
            may_run_twice(what, d)
        raise LeaseLost(f"{d!r} is no longer leased by this worker")

    def extended(self, d: Delivery, seconds: float, *, start: float) -> None:
        lease = lease_of(d)
        if self._table.extend(lease, seconds, start=start):
            lease.deadline = start + seconds

    def settled(self, d: Delivery) -> None:
        lease = lease_of(d)
        lease.settled = True
        self._table.settle(lease)
        if self._current.get(lease.key) is lease:
            del self._current[lease.key]

    async def remove(self, queue: str, url: str, deliveries: Sequence[Delivery], what: str) -> None:
        """Delete the originals of ``deliveries``, whose new messages are out, then let go of
        their leases. A delete that fails keeps them ours: the caller tries again, and only
        the delete is repeated."""
        refused = set(
            await self._queues.delete(queue, url, [lease_of(d).receipt for d in deliveries])
        )
        for d in deliveries:
            self.settled(d)
            if lease_of(d).receipt in refused:
                may_run_twice(what, d)


def lease_of(d: Delivery) -> Lease:
    assert isinstance(d.token, Lease), f"{d!r} was not delivered by an SqsBroker"
    return d.token


def half_done(d: Delivery) -> bool:
    """Its new message is out, but its original was not deleted."""
    return isinstance(d.token, Lease) and d.token.copied and not d.token.settled


def may_run_twice(what: str, d: Delivery) -> None:
    log.warning(
        "%s of %r: its new message was sent but the original could not be deleted before "
        "its lease ran out; the job may run twice",
        what,
        d,
    )


def carried(d: Delivery) -> dict[str, Any]:
    """The attributes a copy of ``d`` that is no delivery (a release, an early message sent
    again) keeps, with the deliveries before this one as ``aw-base`` (`handed_back`)."""
    attrs = {k: v for k, v in lease_of(d).attributes.items() if k not in (ENC, BASE)}
    if count := handed_back(d):
        attrs[BASE] = _attr(count)
    return attrs
