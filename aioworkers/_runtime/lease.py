"""The lease loop: the only caller of `Broker.extend`, and of `IdempotencyStore.extend`."""

from __future__ import annotations

import logging
from typing import Protocol

import anyio

from ..brokers.base import Delivery
from ..errors import BrokerUnavailable
from ..idempotency.base import IdempotencyStore, StoreUnavailable
from ..store.base import Store
from ..telemetry.worker import WorkerTelemetry
from .clock import SYSTEM_CLOCK, Clock
from .inflight import InFlight

log = logging.getLogger("aioworkers")


class Extends(Protocol):
    """The one broker call the lease loop makes (a `Broker` has it)."""

    async def extend(self, deliveries: list[Delivery], *, lease: float) -> list[Delivery]: ...


async def keep_leases(
    broker: Extends,
    inflight: InFlight,
    *,
    lease: float,
    store: IdempotencyStore | None = None,
    telemetry: WorkerTelemetry | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> None:
    """Every ``lease / 3`` seconds, extend every delivery held and every idempotency claim
    of a running job by ``lease``; cancel runs whose lease or claim was lost, so a worker
    that stalled never settles a job, or runs a key, another worker now holds."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_keep_deliveries, broker, inflight, lease, telemetry, clock)
        if store is not None:
            # A loop of its own: a slow store must not delay the broker's heartbeat.
            tg.start_soon(_keep_claims, store, inflight, lease, clock)


async def _keep_deliveries(
    broker: Extends,
    inflight: InFlight,
    lease: float,
    telemetry: WorkerTelemetry | None,
    clock: Clock,
) -> None:
    while True:
        await clock.sleep(lease / 3)
        held = inflight.snapshot()
        if not held:
            continue
        try:
            lost = await broker.extend(held, lease=lease)
        except BrokerUnavailable as exc:
            # Two more tries fit in the lease before it runs out.
            log.warning("could not extend %d leases: %s", len(held), exc)
            continue
        # A delivery acked while the heartbeat was on its way, or still settling, is "not
        # held" for the broker: no lost lease. A settling run's own broker call tells.
        really = [delivery for delivery in lost if inflight.lose(delivery)]
        if telemetry is not None:
            settled = {id(d) for d in lost}.difference(id(d) for d in really)
            telemetry.extended([d for d in held if id(d) not in settled], really)
        for delivery in really:
            log.warning("lease lost for %r: cancelling its run", delivery)


async def _keep_claims(
    store: IdempotencyStore, inflight: InFlight, lease: float, clock: Clock
) -> None:
    while True:
        await clock.sleep(lease / 3)
        held = inflight.claims()
        running = inflight.job_ids() if isinstance(store, Store) else {}
        slots = inflight.slots()  # concurrency slots (only with a Store: limits.py)
        if not held and not running and not slots:
            continue
        try:
            if isinstance(store, Store):
                # One round trip: the claims extended, and the cancel marks of every job
                # running here read (a cancelled one stops within one beat).
                beat = await store.beat(
                    lease=lease, claims=list(held), leases=list(slots), watch=list(running)
                )
                lost = beat.lost_claims + beat.lost_leases
                held.update(slots)  # owners are random tokens: no pair is in both
                for job_id in beat.cancelled:
                    if job_id in running and inflight.cancel_by_user(running[job_id]):
                        log.info("job %s cancelled: stopping its run", job_id)
            else:
                lost = await store.extend(list(held), lease=lease)
        except StoreUnavailable as exc:
            log.warning("could not extend %d idempotency claims: %s", len(held), exc)
            continue
        except Exception:
            # A faulty store must not take the broker's heartbeat down with it.
            log.exception("could not extend %d idempotency claims", len(held))
            continue
        for claim in lost:
            # Another run may hold the key now: never run it twice at once. (A claim
            # completed or released while the beat was on its way is no loss.)
            if inflight.lose(held[claim], claim):
                log.warning(
                    "key %r (idempotency or concurrency slot) lost by %r: cancelling its run",
                    claim[0],
                    held[claim],
                )
