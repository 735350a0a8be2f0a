"""Run one delivery: decode, look the task up, bind arguments, call the handler.

Returns an `Outcome` and never calls the broker: settling is `settle.py`'s job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..brokers.base import Delivery
from ..envelope import Envelope, decode
from ..errors import DecodeError
from ..job import Job, _current, from_epoch_ms
from ..task import Task
from .classify import JobCancelled, TooManyDeliveries
from .inflight import Run


@dataclass(slots=True)
class Outcome:
    """What happened to one delivery: ``error`` is None on success."""

    envelope: Envelope | None
    task: Task[Any, Any] | None
    error: BaseException | None
    duration: float = 0.0


class Executor:
    def __init__(
        self,
        registry: Mapping[str, Task[Any, Any]],
        *,
        max_message_size: int,
        max_deliveries: int,
    ) -> None:
        self._registry = registry
        self._max_size = max_message_size
        self._max_deliveries = max_deliveries

    def prepare(
        self, delivery: Delivery
    ) -> tuple[Envelope | None, Task[Any, Any] | None, DecodeError | None]:
        """Decode the body, find its task and bind its arguments; any failure is final."""
        try:
            env = decode(delivery.body, max_size=self._max_size)
        except DecodeError as exc:
            return None, None, exc
        task = self._registry.get(env.task)
        if task is None:
            # Never import or getattr a name from a message: the registry is the allow-list.
            return env, None, DecodeError("unknown_task", f"no task named {env.task!r}")
        try:
            task.check_arguments(env.args, env.kwargs)
        except TypeError as exc:
            return env, task, DecodeError("bad_arguments", str(exc))
        return env, task, None

    async def execute(self, delivery: Delivery, run: Run) -> Outcome:
        env, task, invalid = self.prepare(delivery)
        if invalid is not None or env is None or task is None:
            return Outcome(env, task, invalid)
        if delivery.count > self._max_deliveries:
            # Checked before dispatch: a job that kills its process must not loop forever.
            error = TooManyDeliveries(f"delivered {delivery.count} times")
            return Outcome(env, task, error)
        if run.cancel_requested:
            return Outcome(env, task, JobCancelled())
        return await self._run(delivery, env, task, run)

    async def _run(
        self, delivery: Delivery, env: Envelope, task: Task[Any, Any], run: Run
    ) -> Outcome:
        _current.set(
            Job(
                id=env.id,
                task=env.task,
                attempt=env.attempt,
                queue=delivery.queue,
                key=env.key,
                enqueued_at=from_epoch_ms(env.enqueued_at),
                delivery_count=delivery.count,
                headers=env.headers,
            )
        )
        error: BaseException | None = None
        start = time.perf_counter()
        try:
            timeout = task.policy.timeout
            if timeout is None:
                await task.fn(*env.args, **env.kwargs)
            else:
                limit = asyncio.timeout(timeout)
                try:
                    async with limit:
                        await task.fn(*env.args, **env.kwargs)
                except TimeoutError as exc:
                    if not limit.expired():
                        raise  # the handler's own timeout, not the task's
                    raise TimeoutError(f"task {task.name!r} timed out after {timeout}s") from exc
        except asyncio.CancelledError:
            if not run.cancel_requested:
                raise  # not ours: let whoever cancelled the task see it
            # Ours (shutdown past grace, or lease lost): swallow it so the job is released.
            uncancel()
            error = JobCancelled()
        except Exception as exc:
            error = exc
        return Outcome(env, task, error, time.perf_counter() - start)


def uncancel() -> None:
    """Take back a cancellation of the current task that the runtime asked for itself."""
    current = asyncio.current_task()
    if current is not None:
        current.uncancel()
