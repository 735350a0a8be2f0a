"""The lease loop: the only caller of `Broker.extend`."""

from __future__ import annotations

import logging

import anyio

from ..brokers.base import Broker
from ..errors import BrokerUnavailable
from .inflight import InFlight

log = logging.getLogger("aioworkers")


async def keep_leases(broker: Broker, inflight: InFlight, *, visibility: float) -> None:
    """Every ``visibility / 3`` seconds, extend every delivery held; cancel runs whose lease
    was lost, so a worker that stalled never settles a job another worker now holds."""
    interval = visibility / 3
    while True:
        await anyio.sleep(interval)
        held = inflight.snapshot()
        if not held:
            continue
        try:
            lost = await broker.extend(held, visibility=visibility)
        except BrokerUnavailable as exc:
            # Two more tries fit in the lease before it runs out.
            log.warning("could not extend %d leases: %s", len(held), exc)
            continue
        for delivery in lost:
            log.warning("lease lost for %r: cancelling its run", delivery)
            inflight.lose(delivery)
