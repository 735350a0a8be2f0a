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
from typing import Any

from ._runtime import classify as c
from ._runtime.executor import Executor
from ._runtime.inflight import Run
from ._runtime.settle import DEFAULT_POLICY, dead_letter_for
from .app import App
from .brokers._sqs_wire import BASE, ENC, _attr_value, decode_body
from .brokers.base import Delivery
from .envelope import encode

log = logging.getLogger("aioworkers")

# Jobs are cancelled this long before Lambda's deadline, so their records can be reported.
MARGIN = 1.0

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
        runs: dict[asyncio.Task[None], Run] = {}
        for i, record in enumerate(records):
            run = Run()
            run.task = asyncio.ensure_future(self._one(record, run, done, i))
            runs[run.task] = run
        if runs:
            _, pending = await asyncio.wait(runs, timeout=_time_left(context))
            for task in pending:
                log.warning("lambda time is running out: cancelling a job")
                runs[task].cancel()
            await asyncio.wait(runs)
        failed = [str(r.get("messageId", "")) for i, r in enumerate(records) if not done.get(i)]
        return {"batchItemFailures": [{"itemIdentifier": mid} for mid in failed]}

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
        self, record: Mapping[str, Any], run: Run, done: dict[int, bool], i: int
    ) -> None:
        """Run one record's job; ``done[i]`` says whether Lambda may delete the record."""
        done[i] = await self._run(record, run)

    async def _run(self, record: Mapping[str, Any], run: Run) -> bool:
        run.started = True
        delivery = self.delivery(record)
        try:
            outcome = await self.executor().execute(delivery, run)
            env = outcome.envelope
            policy = outcome.task.policy if outcome.task is not None else DEFAULT_POLICY
            decision = c.classify(outcome.error, env.attempt if env else 1, policy)
            return await self._settle(delivery, outcome, decision)
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

    def delivery(self, record: Mapping[str, Any]) -> Delivery:
        """The `Delivery` of an SQS event record (queue name from its ARN, without the
        broker's prefix; count from ApproximateReceiveCount)."""
        attrs = record.get("messageAttributes") or {}
        name = str(record.get("eventSourceARN", "")).rsplit(":", 1)[-1]
        queue_name = getattr(self.app.broker, "queue_name", None)
        queue = queue_name(name) if queue_name is not None else name
        received = int((record.get("attributes") or {}).get("ApproximateReceiveCount", 1))
        base = int(_attr_value(attrs, BASE) or 0)
        body = decode_body(str(record.get("body", "")), _attr_value(attrs, ENC))
        return Delivery(queue, str(record.get("messageId", "")), body, base + received)


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
