"""One job's life, the same for a worker and the Lambda adapter: start it, execute it, settle
its outcome or count it as lost, free its slot."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from ..brokers.base import Delivery, Screened
from ..telemetry.worker import WorkerTelemetry
from . import unique
from .executor import Executor, Prepared
from .inflight import InFlight, Run
from .outcome import Ack, OutcomeName
from .records import Starting
from .scheduler import Scheduler
from .settle import Answered, BatchedAcks, Settler

log = logging.getLogger("aioworkers")


class Jobs:
    """Runs deliveries as jobs: one plain asyncio task each (the hot path pays for nothing
    more), whose result is what the delivery was counted as (None: unknown).

    With a ``scheduler`` (a worker), a delivery starts when the scheduler lets it, and its
    slot goes to the next one when it is settled. With ``keep_held`` (the Lambda adapter),
    a delivery stays in ``inflight`` once settled, its lease still kept: Lambda deletes the
    records only when the function returns.
    """

    def __init__(
        self,
        executor: Executor,
        settler: Settler,
        inflight: InFlight,
        *,
        scheduler: Scheduler | None = None,
        telemetry: WorkerTelemetry | None = None,
        keep_held: bool = False,
        acks: BatchedAcks | None = None,
    ) -> None:
        self._executor = executor
        self._settler = settler
        self._inflight = inflight
        self._scheduler = scheduler
        self._telemetry = telemetry
        self._keep_held = keep_held
        # With the worker's acker and no telemetry (a span ends with its job's task): a
        # plain ack is handed to the acker, and the job's task ends without waiting for it.
        self._acks = acks if telemetry is None and not keep_held else None
        if self._acks is not None:
            self._acks.on_acked = self._acked
        traced = telemetry is not None and telemetry.tracer is not None
        self._job = self._traced if traced else self.run
        # What `screen` decoded of deliveries not started yet: each body is decoded once.
        self._prepared: dict[Delivery, Prepared] = {}

    async def screen(
        self, deliveries: Sequence[Delivery], screened: Sequence[Screened | None] | None = None
    ) -> None:
        """Read the cancel marks of fetched deliveries, in one round trip, before they
        are admitted (see `Records.screen`), and write the start of those whose tasks keep
        results in the same one; their bodies are decoded here, once. ``screened``: what
        the broker read of their marks as it fetched them (`ScreensCancelMarks`); the
        store is asked only for the others."""
        records = self._executor.records
        if records is not None and deliveries:
            prepare, prepared, ids = self._executor.prepare, self._prepared, []
            starts: list[Starting] = []
            marked = []
            for i, delivery in enumerate(deliveries):
                try:
                    env, task, invalid = one = prepare(delivery)
                except Exception:  # left to its run, which logs it
                    continue
                prepared[delivery] = one
                if env is not None:
                    seen = screened[i] if screened else None
                    if seen is None or seen[0] != env.id:
                        ids.append(env.id)
                    elif seen[1]:
                        marked.append(env.id)
                    if invalid is None and task is not None and task.result_ttl is not None:
                        starts.append((env, delivery, task.result_ttl))
            await records.screen_ids(ids, starts, marked)

    def admit(self, deliveries: Sequence[Delivery], reserved: int) -> bool:
        """Hand fetched deliveries to the scheduler (in the ``reserved`` slots fetched for)
        and start what it lets start; False once it is closed (the caller releases them)."""
        assert self._scheduler is not None
        ready = self._scheduler.submit(deliveries, reserved)
        if ready is None:
            return False  # the caller unscreens them
        for delivery, run in ready:
            self.start(delivery, run)
        return True

    def start(
        self, delivery: Delivery, run: Run, prepared: Prepared | None = None
    ) -> asyncio.Task[OutcomeName | None]:
        if prepared is None and self._prepared:
            prepared = self._prepared.pop(delivery, None)
        task = asyncio.get_running_loop().create_task(self._job(delivery, run, prepared))
        run.task = task
        return task

    async def hand_back(self, deliveries: list[Delivery]) -> None:
        """Release deliveries held but never started (see `Settler.hand_back`)."""
        await self.unscreen(deliveries)
        try:
            await self._settler.hand_back(deliveries)
        finally:
            for delivery in deliveries:
                self._inflight.remove(delivery)

    async def unscreen(self, deliveries: Sequence[Delivery]) -> None:
        """Forget what `screen` did for deliveries that will not start here: what it
        decoded, and the starts it wrote (their records say queued again)."""
        ids = []
        for delivery in deliveries:
            one = self._prepared.pop(delivery, None)
            if one is not None and one[0] is not None:
                ids.append(one[0].id)
        records = self._executor.records
        if records is not None and ids:
            await records.unstart(ids)

    async def run(
        self, delivery: Delivery, run: Run, prepared: Prepared | None = None
    ) -> OutcomeName | None:
        """Execute and settle one delivery; ``prepared`` is what `Executor.prepare` made of
        it, if known."""
        run.started = True
        held = False  # the delivery stays held after this task, until its ack is answered
        try:
            with run:  # `run.catch_cancel()`, without the call
                outcome = await self._executor.execute(delivery, run, prepared)
                if run.lost:
                    # Another worker may hold it now: settling anything would act over it.
                    self._settler.count(OutcomeName.LEASE_LOST, delivery, outcome)
                    return OutcomeName.LEASE_LOST
                # From here the settle's own broker call says whether the lease is still
                # ours: a heartbeat answered "not held" (it crossed the ack) cancels nothing.
                run.settling = True
                if (
                    self._acks is not None
                    and type(outcome.decision) is Ack
                    and not (outcome.envelope and outcome.envelope.headers)
                ):
                    # The hot path: no task waits for its ack. The acker counts it and
                    # frees its slot once the broker answers (`_acked`); until then the
                    # delivery stays held, slot and lease.
                    self._acks.ack_later(delivery, outcome)
                    held = True
                    return None
                name = await self._settler.settle(delivery, outcome)
                if name in unique.ENDED and outcome.envelope and outcome.envelope.headers:
                    await unique.free_ended(self._executor.shared, outcome, name)
                return name
            # Here only if the runtime's cancel reached this far and was taken back.
            if run.lost:
                # The lease was found lost before the handler could see the cancel.
                self._settler.count(OutcomeName.LEASE_LOST, delivery)
                return OutcomeName.LEASE_LOST
        except Exception:
            log.exception("internal error while running %r; the broker will redeliver it", delivery)
        finally:
            # Free the slot (inline: this runs once a job), and start the next delivery.
            if not (self._keep_held or held):
                self._free(delivery)
        return None

    def _free(self, delivery: Delivery) -> None:
        self._inflight.remove(delivery)
        if self._scheduler is not None:
            for ready in self._scheduler.done():
                self.start(*ready)

    def _acked(self, answered: list[Answered], refused: set[int] | BaseException) -> None:
        """The broker answered acks made without waiting (`BatchedAcks.ack_later`): count
        them, then free their slots and start what waits for them."""
        try:
            self._settler.acked_many(answered, refused)
        finally:
            remove = self._inflight.remove
            for delivery, _ in answered:
                remove(delivery)
            if self._scheduler is not None:
                for ready in self._scheduler.done(len(answered)):
                    self.start(*ready)

    async def _traced(
        self, delivery: Delivery, run: Run, prepared: Prepared | None = None
    ) -> OutcomeName | None:
        assert self._telemetry is not None
        try:
            # Decoded once, here: the span needs the envelope's ids and trace headers.
            if prepared is None:
                prepared = self._executor.prepare(delivery)
            span, token = self._telemetry.start_attempt(delivery, prepared[0])
        except Exception:
            # A failing propagator or sampler must not cost the job (or its slot).
            log.exception("could not start the span of %r; running it untraced", delivery)
            return await self.run(delivery, run, prepared)
        # The span is started and ended here rather than in a wrapper coroutine: each layer
        # of coroutines costs again every time the job suspends and resumes.
        error: BaseException | None = None
        try:
            return await self.run(delivery, run, prepared)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._telemetry.end_attempt(span, token, error)
            error = None  # no reference cycle through the traceback
