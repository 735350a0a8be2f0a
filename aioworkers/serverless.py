"""AWS Lambda: run the jobs of an SQS event batch with the app's tasks.

```python
app = aioworkers.App("sqs://?region=eu-west-1")
handler = aioworkers.lambda_handler(app)      # the function's handler
```

Each record is one job, run concurrently with the others under the same rules as a worker:
task timeouts, idempotency keys, `classify`. The event source mapping must have
``ReportBatchItemFailures`` on: the handler returns ``{"batchItemFailures": [...]}`` with
the records Lambda must not delete (SQS delivers them again after the queue's visibility
timeout). Lambda deletes the rest.

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
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from ._runtime import classify as c
from ._runtime.executor import Executor, Outcome, uncancel
from ._runtime.inflight import InFlight, Run
from ._runtime.lease import keep_leases
from ._runtime.settle import DEFAULT_POLICY, dead_letter_for
from .app import App
from .brokers._sqs_wire import BASE, ENC, ETA, _attr_value, read_body, read_count, read_eta
from .brokers.base import Broker, Delivery
from .envelope import encode
from .errors import BrokerUnavailable, DecodeError

log = logging.getLogger("aioworkers")

# Jobs are cancelled this long before Lambda's deadline, so their records can be reported.
MARGIN = 1.0

MAX_BATCH = 10  # SQS's limit for ChangeMessageVisibilityBatch

_loop: asyncio.AbstractEventLoop | None = None


def _event_loop() -> asyncio.AbstractEventLoop:
    """One loop for the process: clients created in one invocation work in the next."""
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop


class LambdaHandler:
    """``handler(event, context)`` for an SQS event source; see the module doc."""

    def __init__(self, app: App) -> None:
        self.app = app
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
            await self.app._run_hooks("startup")
            self._started = True
        records = list(event.get("Records") or [])
        done: dict[int, bool] = {}  # record index -> Lambda may delete it
        # Every record stays in the table (its visibility extended) until the function
        # returns: Lambda deletes the finished ones only then, and one that reappeared
        # before would be run again by another invocation.
        inflight = InFlight()
        runs: dict[asyncio.Task[None], Run] = {}
        for i, record in enumerate(records):
            delivery, invalid = self.read(record)
            run = inflight.add(delivery)
            run.task = asyncio.ensure_future(self._one(delivery, invalid, run, done, i))
            runs[run.task] = run
        if runs:
            beat = asyncio.ensure_future(self._keep_leases(inflight))
            try:
                await self._wait(runs, context)
            finally:
                beat.cancel()
                (ended,) = await asyncio.gather(beat, return_exceptions=True)
                if isinstance(ended, Exception):
                    log.error("the lambda heartbeat failed", exc_info=ended)
        failed = [str(r.get("messageId", "")) for i, r in enumerate(records) if not done.get(i)]
        return {"batchItemFailures": [{"itemIdentifier": mid} for mid in failed]}

    async def _wait(self, runs: dict[asyncio.Task[None], Run], context: Any) -> None:
        _, pending = await asyncio.wait(runs, timeout=_time_left(context))
        for task in pending:
            log.warning("lambda time is running out: cancelling a job")
            runs[task].cancel()
        await asyncio.wait(runs)
        for task in runs:
            # `_one` catches what it can; anything else is logged here, never left to
            # "Task exception was never retrieved". The record is reported for redelivery.
            if not task.cancelled() and task.exception() is not None:
                log.error("lambda job failed", exc_info=task.exception())

    async def _keep_leases(self, inflight: InFlight) -> None:
        """The worker's lease loop over this invocation's records: idempotency claims, and
        record visibility when the app's broker is ``sqs://``."""
        broker = self.app.broker
        records = _RecordLeases(broker if hasattr(broker, "send_dead_letter") else None, self._urls)
        # The lease loop calls only `extend` on its broker, which `_RecordLeases` provides.
        await keep_leases(
            cast(Broker, records),
            inflight,
            visibility=self.app.visibility_timeout,
            store=self.app.idempotency,
        )

    def executor(self) -> Executor:
        if self._executor is None:
            app = self.app
            self._executor = Executor(
                app.tasks,
                max_message_size=app.max_message_size,
                max_deliveries=app.max_deliveries,
                store=app.idempotency,
                lease=app.visibility_timeout,
                ttl=app.idempotency_ttl,
            )
        return self._executor

    async def _one(
        self,
        delivery: Delivery,
        invalid: DecodeError | None,
        run: Run,
        done: dict[int, bool],
        i: int,
    ) -> None:
        """Run one record's job; ``done[i]`` says whether Lambda may delete the record."""
        done[i] = await self._run(delivery, invalid, run)

    async def _run(self, delivery: Delivery, invalid: DecodeError | None, run: Run) -> bool:
        run.started = True
        try:
            if invalid is None:
                outcome = await self.executor().execute(delivery, run)
            else:
                # Never run; the envelope, if the body is one, names the job in the DLQ.
                outcome = Outcome(self.executor().prepare(delivery)[0], None, invalid)
            if run.lost:
                log.warning("lease lost for %r: reported for redelivery", delivery)
                return False
            env = outcome.envelope
            policy = outcome.task.policy if outcome.task is not None else DEFAULT_POLICY
            decision = c.classify(outcome.error, env.attempt if env else 1, policy)
            return await self._settle(delivery, outcome, decision)
        except asyncio.CancelledError:
            if not run.lost:
                raise
            # The heartbeat found the lease or claim lost while this run was settling.
            uncancel()
            return False
        except Exception:
            log.exception("could not run %r; reporting it for redelivery", delivery)
            return False

    async def _settle(self, delivery: Delivery, outcome: Any, decision: c.Decision) -> bool:
        broker = self.app.broker
        send_dead = getattr(broker, "send_dead_letter", None)
        on_sqs = send_dead is not None
        match decision:
            case c.Ack():
                return True
            case c.RetryLater(delay=delay) if on_sqs:
                assert outcome.envelope is not None
                body = encode(outcome.envelope.next_attempt())
                log.warning("job %s failed, retry in %.2fs: %s", delivery, delay, outcome.error)
                await broker.publish(delivery.queue, [body], delay=delay)
                return True
            case c.Defer(delay=delay) if on_sqs:
                await broker.publish(delivery.queue, [delivery.body], delay=delay)
                return True
            case c.DeadLetter(reason=reason) if send_dead is not None:
                letter = dead_letter_for(delivery, outcome, reason)
                log.error("job %s dead-lettered (%s): %s", delivery, reason, outcome.error)
                await send_dead(delivery.queue, delivery.body, letter)
                return True
        log.warning("job %s not done (%s): reported for redelivery", delivery, decision)
        return False

    def read(self, record: Mapping[str, Any]) -> tuple[Delivery, DecodeError | None]:
        """The `Delivery` of an SQS event record (queue name from its ARN, without the
        broker's prefix; count from ApproximateReceiveCount plus ``aw-base``), and why it
        can never run if an attribute the adapter reads is malformed."""
        arn = str(record.get("eventSourceARN", ""))
        name = arn.rsplit(":", 1)[-1]
        queue_name = getattr(self.app.broker, "queue_name", None)
        queue = queue_name(name) if queue_name is not None else name
        message_id = str(record.get("messageId", ""))
        token = (arn, str(record.get("receiptHandle", "")))
        text = str(record.get("body", ""))
        body: bytes | None = None
        count, invalid = 1, None
        try:
            attrs, system = _attributes(record)
            body = read_body(text, _attr_value(attrs, ENC))
            received = system.get("ApproximateReceiveCount")
            count = read_count("ApproximateReceiveCount", _str(received), least=1)
            count += read_count(BASE, _attr_value(attrs, BASE))
            # The record runs when SQS delivers it; its eta is read only to refuse a
            # malformed one, as a worker's broker does.
            read_eta(_attr_value(attrs, ETA))
        except DecodeError as exc:
            invalid = exc
        if body is None:
            body = text.encode(errors="backslashreplace")  # as it came, for the DLQ
        return Delivery(queue, message_id, body, count, token), invalid


class _RecordLeases:
    """Extends the visibility of the records an invocation runs, as `SqsBroker.extend` does
    for a worker's deliveries: the one `Broker` method the lease loop calls. Without an
    ``sqs://`` broker (``broker`` None) there is nothing to extend."""

    def __init__(self, broker: Any, urls: dict[str, str]) -> None:
        self._broker = broker
        self._urls = urls
        self._off = broker is None

    async def extend(self, deliveries: Sequence[Delivery], *, lease: float) -> list[Delivery]:
        by_arn: dict[str, list[Delivery]] = {}
        for d in deliveries:
            arn, receipt = d.token
            if arn and receipt:
                by_arn.setdefault(arn, []).append(d)
        if self._off or not by_arn:
            return []
        seconds = max(1, math.ceil(lease - 1e-9))
        lost: list[Delivery] = []
        try:
            from .brokers.sqs import _mapped

            client = await self._broker.client()
            for arn, group in by_arn.items():
                async with _mapped("extend"):
                    url = await self._url(client, arn)
                    for start in range(0, len(group), MAX_BATCH):
                        chunk = group[start : start + MAX_BATCH]
                        lost += await _extend_batch(client, url, chunk, seconds)
        except BrokerUnavailable:
            raise  # the lease loop logs it and tries again at the next beat
        except Exception as exc:
            # Most likely the function's role lacks sqs:ChangeMessageVisibility: the records
            # then stay hidden for the queue's own visibility timeout. Said once a batch.
            self._off = True
            log.warning("could not extend the visibility of the records being run: %r", exc)
        return lost

    async def _url(self, client: Any, arn: str) -> str:
        url = self._urls.get(arn)
        if url is None:
            parts = arn.split(":")
            request = {"QueueName": parts[-1]}
            if len(parts) == 6 and parts[4]:
                request["QueueOwnerAWSAccountId"] = parts[4]
            url = self._urls[arn] = str((await client.get_queue_url(**request))["QueueUrl"])
        return url


async def _extend_batch(
    client: Any, url: str, chunk: list[Delivery], seconds: int
) -> list[Delivery]:
    """Reports the records whose receipt SQS refused: another receive (or a delete) made
    them no longer this invocation's."""
    reply = await client.change_message_visibility_batch(
        QueueUrl=url,
        Entries=[
            {"Id": str(i), "ReceiptHandle": d.token[1], "VisibilityTimeout": seconds}
            for i, d in enumerate(chunk)
        ],
    )
    return [chunk[int(f["Id"])] for f in reply.get("Failed") or []]


def _attributes(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A record's message attributes and its system attributes."""
    attrs = record.get("messageAttributes") or {}
    system = record.get("attributes") or {}
    if not isinstance(attrs, dict) or not isinstance(system, dict):
        raise DecodeError("schema_error", "the record's attributes are not objects")
    return attrs, system


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def _time_left(context: Any) -> float | None:
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is None:
        return None
    return max(0.0, float(remaining()) / 1000 - MARGIN)


def lambda_handler(app: App) -> LambdaHandler:
    """The AWS Lambda handler for an SQS event source running ``app``'s tasks:
    ``handler = aioworkers.lambda_handler(app)``."""
    return LambdaHandler(app)


__all__ = ["LambdaHandler", "lambda_handler"]
