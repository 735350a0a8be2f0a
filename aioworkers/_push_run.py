"""One push, one job: read into a `Delivery`, run by the job runtime (`Jobs`, the executor,
the inline settle strategy), and the status code its outcome means to the platform."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from ._push_read import Pushed
from ._runtime.clock import SYSTEM_CLOCK, Clock
from ._runtime.executor import Executor, ExecutorSettings, Prepared, Runnable, executor_for
from ._runtime.inflight import InFlight
from ._runtime.jobs import Jobs
from ._runtime.lease import keep_leases
from ._runtime.outcome import OutcomeName
from ._runtime.policy import Policy
from ._runtime.settle import InlineCompleter, Settler
from .app import App
from .brokers.base import DeadLetter, DeadLetterWriter, Delivery
from .envelope import encode

log = logging.getLogger("aioworkers")

# What the platform may drop: the job is done, or its dead letter is in the DLQ.
ACKED = {
    OutcomeName.OK: 204,
    OutcomeName.DUPLICATE: 200,
    OutcomeName.DEAD: 200,
    OutcomeName.CANCELLED: 200,
}


@dataclass(slots=True)
class Result:
    status: int
    outcome: str
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


class _Later(InlineCompleter):
    """The inline strategy with no publisher: a retry or deferral is left to the platform
    (a 503), and its delay kept for the ``Retry-After``."""

    def __init__(self, writer: DeadLetterWriter) -> None:
        super().__init__(None, writer)
        self.delay: float | None = None
        self.reason: str | None = None

    async def retry(self, delivery: Delivery, *, body: bytes, delay: float) -> bool:
        self.delay = delay
        return False

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> bool:
        self.reason = letter.reason
        return await super().dead_letter(delivery, letter)


class _NoLeases:
    """A push holds no broker lease: the platform's request is the lease."""

    async def extend(self, deliveries: list[Delivery], *, lease: float) -> list[Delivery]:
        return []


class PushTask:
    """A registered task as a push runs it: under its job's key in the store (a platform
    that pushes one message twice runs it once), its timeout capped by the push's."""

    __slots__ = ("_task", "idempotent", "policy")

    def __init__(self, task: Runnable, cap: float | None, idempotent: bool) -> None:
        self._task = task
        self.idempotent = idempotent or task.idempotent
        own = task.policy.timeout
        capped = cap is not None and (own is None or own > cap)
        self.policy: Policy = replace(task.policy, timeout=cap) if capped else task.policy

    @property
    def name(self) -> str:
        return self._task.name

    @property
    def fn(self) -> Callable[..., Coroutine[Any, Any, Any]]:
        return self._task.fn

    def check_arguments(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        self._task.check_arguments(args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


class PushTasks(Mapping[str, Runnable]):
    """The app's registry (read at each lookup: tasks may be registered later) as
    `PushTask`s."""

    def __init__(self, app: App, cap: float | None, idempotent: bool) -> None:
        self._app, self._cap, self._idempotent = app, cap, idempotent
        self._made: dict[int, PushTask] = {}

    def __getitem__(self, name: str) -> Runnable:
        task = cast("Runnable", self._app.tasks[name])
        made = self._made.get(id(task))
        if made is None or made._task is not task:
            made = self._made[id(task)] = PushTask(task, self._cap, self._idempotent)
        return cast("Runnable", made)

    def __iter__(self) -> Iterator[str]:
        return iter(self._app.tasks)

    def __len__(self) -> int:
        return len(self._app.tasks)


class _PushSettings:
    """The app as `executor_for` reads it, with the push's view of its tasks."""

    def __init__(self, app: App, tasks: PushTasks) -> None:
        self._app = app
        self.tasks = tasks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._app, name)


class PushRunner:
    """Runs pushes as jobs of ``app``; ``timeout`` caps each job's run."""

    def __init__(self, app: App, *, timeout: float | None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.app = app
        self.timeout = timeout
        self.clock = clock
        self._executor: Executor | None = None

    def executor(self) -> Executor:
        if self._executor is None:
            idempotent = self.app.idempotency is not None
            settings = _PushSettings(self.app, PushTasks(self.app, self.timeout, idempotent))
            self._executor = executor_for(cast("ExecutorSettings", settings), clock=self.clock)
        return self._executor

    def read(self, pushed: Pushed, queue: str | None) -> tuple[Delivery, Prepared]:
        """The push as a delivery: its attempt the platform's when that is higher than the
        envelope's (a redelivered body still says attempt 1), so retries end."""
        executor = self.executor()
        body = pushed.body
        env, task, invalid = executor.prepare(Delivery(self.app.queue, "", body))
        if pushed.invalid is not None:
            invalid = pushed.invalid
        elif env is not None and pushed.attempt > env.attempt:
            env = replace(env, attempt=pushed.attempt)
            body = encode(env)
        queue = queue or getattr(task, "queue", None) or self.app.queue
        message_id = pushed.message_id or (env.id if env is not None else "")
        delivery = Delivery(queue, message_id, body, max(pushed.attempt, 1))
        return delivery, (env, task, invalid)

    async def run(self, pushed: Pushed, queue: str | None) -> Result:
        delivery, prepared = self.read(pushed, queue)
        broker = self.app.broker
        assert isinstance(broker, DeadLetterWriter)  # push_app checked it
        completer = _Later(broker)
        inflight = InFlight()
        jobs = Jobs(self.executor(), Settler(completer, clock=self.clock), inflight)
        run = inflight.add(delivery)
        job = jobs.start(delivery, run, prepared)
        # Idempotency claims are extended while the job runs, as a worker's lease loop does.
        beat = asyncio.ensure_future(
            keep_leases(
                _NoLeases(),
                inflight,
                lease=self.app.visibility_timeout,
                store=self.app.idempotency,
                clock=self.clock,
            )
        )
        try:
            name = await asyncio.shield(job)
        except asyncio.CancelledError:
            run.cancel()  # the request was cancelled (the server stopped): hand it back
            raise
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
        return _result(name, prepared, completer)


def _result(name: OutcomeName | None, prepared: Prepared, completer: _Later) -> Result:
    env = prepared[0]
    body: dict[str, Any] = {"outcome": str(name)} if name is not None else {"outcome": "unknown"}
    if env is not None:
        body["job_id"] = env.id
    if name in ACKED:
        if name is OutcomeName.DEAD:
            body["reason"] = completer.reason
        return Result(ACKED[name], body["outcome"], {} if name is OutcomeName.OK else body)
    delay = completer.delay
    if delay is not None:
        body["outcome"] = "retry"
    # Whole seconds, at least one: the header takes no fractions.
    after = str(max(1, math.ceil(delay or 0.0)))
    return Result(503, body["outcome"], body, {"retry-after": after})
