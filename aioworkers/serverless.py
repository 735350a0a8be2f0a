"""AWS Lambda: run the jobs of an SQS event batch with the app's tasks.

```python
app = aioworkers.App("sqs://?region=eu-west-1")
handler = aioworkers.lambda_handler(app)      # the function's handler
```

Each record is one job, run concurrently with the others under the same rules as a worker
(the same job runtime: task timeouts, idempotency keys, retry policy, log lines). The event
source mapping must have ``ReportBatchItemFailures`` on: the handler returns
``{"batchItemFailures": [...]}`` with the records Lambda must not delete (SQS delivers them
again after the queue's visibility timeout). Lambda deletes the rest.

- A retry (with its backoff) or a deferral is sent as a new message through the app's
  broker when it is ``sqs://``; the record then counts as done. Otherwise it is reported as
  a failure and SQS redelivers it after the visibility timeout (the attempt number stays,
  the receive count grows, so ``max_deliveries`` still ends the loop).
- A dead letter (decode errors, ``Reject``, retries spent, ``max_deliveries``) is written to
  the queue's DLQ through an ``sqs://`` broker, confirmed before the record counts as done;
  with another broker it is reported as a failure, for the queue's redrive policy.
- A record with a malformed attribute (``aw-enc`` body that is not base64, an ``aw-base``,
  ``aw-eta`` or ``ApproximateReceiveCount`` that is not a number in range) is a dead letter
  (``decode_error`` / ``schema_error``) like any bad message; the rest of its batch runs.
- While jobs run, a heartbeat every ``visibility_timeout / 3`` extends their idempotency
  claims (a run whose claim is lost is cancelled and reported) and, with an ``sqs://``
  broker, the visibility of their records (ChangeMessageVisibilityBatch), as a worker does.
- Jobs still running one second before the invocation's time runs out are cancelled and
  reported as failures.

The event loop and the broker's clients live at module level, reused across warm
invocations.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

from ._lambda_records import RecordLeases, read_record
from ._runtime.clock import SYSTEM_CLOCK, Clock
from ._runtime.executor import Executor, executor_for
from ._runtime.inflight import InFlight, Run
from ._runtime.jobs import Jobs
from ._runtime.lease import keep_leases
from ._runtime.outcome import OutcomeName
from ._runtime.settle import InlineCompleter, Settler
from .app import App
from .brokers.base import DeadLetterWriter, Delivery, QueueNaming
from .errors import DecodeError

log = logging.getLogger("aioworkers")

# Jobs are cancelled this long before Lambda's deadline, so their records can be reported.
MARGIN = 1.0

# What a record counted as this tells Lambda it may delete: the job is done, or its next
# step (a retry, a deferral or throttle, a dead letter) is in the queue's hands.
DONE = frozenset(
    ("ok", "duplicate", "retried", "deferred", "throttled", "dead", "cancelled", "snoozed")
)

_loop: asyncio.AbstractEventLoop | None = None


@runtime_checkable
class _SqsClient(Protocol):
    """The SQS broker's client, for extending the visibility of the records being run."""

    async def client(self) -> Any: ...


def _event_loop() -> asyncio.AbstractEventLoop:
    """One loop for the process: clients created in one invocation work in the next."""
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop


class LambdaHandler:
    """``handler(event, context)`` for an SQS event source; see the module doc.
    ``job_timeout`` bounds each attempt of a task registered without a ``timeout``, as
    `App.worker`'s does."""

    def __init__(
        self, app: App, *, job_timeout: float | None = None, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.app = app
        self.job_timeout = job_timeout
        self.clock = clock
        self._executor: Executor | None = None
        self._started = False
        self._urls: dict[str, str] = {}  # queue ARN -> URL, for extending record visibility

    def __repr__(self) -> str:
        return f"<LambdaHandler {self.app!r}>"

    def __call__(self, event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
        loop = _event_loop()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return loop.run_until_complete(self.handle(event, context))
        # Called from inside a running loop (a test, a custom runtime): the module's loop
        # cannot run in this thread now, so it runs in a helper thread, one call at a time.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(loop.run_until_complete, self.handle(event, context)).result()

    async def handle(self, event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
        """The same as calling the handler, on a running loop (tests, custom runtimes)."""
        if not self._started:
            await self.app.run_hooks("startup")
            self._started = True
        records = list(event.get("Records") or [])
        # Every record stays in the table (its visibility extended) until the function
        # returns: Lambda deletes the finished ones only then, and one that reappeared
        # before would be run again by another invocation.
        inflight = InFlight()
        jobs = self._jobs(inflight)
        runs: dict[asyncio.Task[OutcomeName | None], Run] = {}
        await jobs.screen([self.read(record)[0] for record in records])  # cancel marks
        for record in records:
            delivery, invalid = self.read(record)
            prepared = self.executor().prepare(delivery)
            if invalid is not None:
                # Never run; the envelope, if the body is one, names the job in the DLQ.
                prepared = (prepared[0], None, invalid)
            run = inflight.add(delivery)
            runs[jobs.start(delivery, run, prepared)] = run
        if runs:
            beat = asyncio.ensure_future(self._keep_leases(inflight))
            try:
                await self._wait(runs, context)
            finally:
                beat.cancel()
                (ended,) = await asyncio.gather(beat, return_exceptions=True)
                if isinstance(ended, Exception):
                    log.error("the lambda heartbeat failed", exc_info=ended)
        failed = [
            str(record.get("messageId", ""))
            for record, task in zip(records, runs, strict=True)
            if task.cancelled() or task.exception() is not None or task.result() not in DONE
        ]
        return {"batchItemFailures": [{"itemIdentifier": mid} for mid in failed]}

    def _jobs(self, inflight: InFlight) -> Jobs:
        broker = self.app.broker
        # Retries and dead letters go through the broker when it is the records' own
        # queue's (sqs://, which writes dead letters directly); else SQS redelivers them.
        # (Other brokers write dead letters directly too, for HTTP push: not SQS's queues.)
        writer: DeadLetterWriter | None = None
        if isinstance(broker, DeadLetterWriter) and isinstance(broker, _SqsClient):
            writer = broker
        completer = InlineCompleter(broker if writer is not None else None, writer)
        settler = Settler(completer, clock=self.clock)
        return Jobs(self.executor(), settler, inflight, keep_held=True)

    async def _wait(self, runs: dict[asyncio.Task[OutcomeName | None], Run], context: Any) -> None:
        _, pending = await asyncio.wait(runs, timeout=_time_left(context))
        for task in pending:
            log.warning("lambda time is running out: cancelling a job")
            runs[task].cancel()
        await asyncio.wait(runs)
        for task in runs:
            # The job catches what it can; anything else is logged here, never left to
            # "Task exception was never retrieved". The record is reported for redelivery.
            if not task.cancelled() and task.exception() is not None:
                log.error("lambda job failed", exc_info=task.exception())

    async def _keep_leases(self, inflight: InFlight) -> None:
        """The worker's lease loop over this invocation's records: idempotency claims, and
        record visibility when the app's broker is ``sqs://``."""
        broker = self.app.broker
        client = None
        if isinstance(broker, DeadLetterWriter) and isinstance(broker, _SqsClient):
            client = await broker.client()  # sqs://: the records' own queues
        await keep_leases(
            RecordLeases(client, self._urls),
            inflight,
            lease=self.app.visibility_timeout,
            store=self.app.idempotency,
            clock=self.clock,
        )

    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = executor_for(self.app, job_timeout=self.job_timeout, clock=self.clock)
        return self._executor

    def read(self, record: Mapping[str, Any]) -> tuple[Delivery, DecodeError | None]:
        """The `Delivery` of an SQS event record (queue name from its ARN, without the
        broker's prefix), and why it can never run if an attribute is malformed."""
        name = str(record.get("eventSourceARN", "")).rsplit(":", 1)[-1]
        broker = self.app.broker
        queue = broker.queue_name(name) if isinstance(broker, QueueNaming) else name
        return read_record(record, queue)


def _time_left(context: Any) -> float | None:
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is None:
        return None
    return max(0.0, float(remaining()) / 1000 - MARGIN)


def lambda_handler(app: App, *, job_timeout: float | None = None) -> LambdaHandler:
    """The AWS Lambda handler for an SQS event source running ``app``'s tasks:
    ``handler = aioworkers.lambda_handler(app)``. ``job_timeout`` bounds each attempt of
    a task registered without a ``timeout``."""
    return LambdaHandler(app, job_timeout=job_timeout)


__all__ = ["LambdaHandler", "lambda_handler"]
