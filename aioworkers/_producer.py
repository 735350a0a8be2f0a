"""The producer side of `App`: `enqueue`, `enqueue_many` and the envelope a call becomes."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from ._app_handlers import HandlerOptions
from ._unique import Holds
from .brokers import Broker
from .brokers.postgres_capabilities import TransactionalPublisher
from .envelope import Envelope, encode, new_id, now_ms
from .errors import ConfigError
from .handles import JobHandle, record_enqueued
from .store import Store
from .task import Call, Task
from .telemetry import Producer, Telemetry, messaging_system


class Enqueueing(HandlerOptions):
    """Mixed into `App`: the producer API (the app's broker, tasks and store are its)."""

    queue: str
    tasks: dict[str, Task[Any, Any]]
    telemetry: Telemetry
    max_message_size: int
    idempotency_ttl: float

    @property
    def broker(self) -> Broker:
        raise NotImplementedError

    @property
    def broker_name(self) -> str:
        raise NotImplementedError

    @property
    def store(self) -> Store:
        raise NotImplementedError

    async def enqueue(
        self,
        task: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        delay: float | None = 0.0,
        key: str | None = None,
        queue: str | None = None,
        conn: object = None,
    ) -> JobHandle:
        """Enqueue a job by task name (the handler need not be importable here); ``conn``
        as in `enqueue_many`."""
        call = Call(task, tuple(args), dict(kwargs or {}), delay or 0.0, key, queue)
        (job,) = await self.enqueue_many([call], conn=conn)
        return job

    async def enqueue_many(self, calls: Iterable[Call], *, conn: object = None) -> list[JobHandle]:
        """Enqueue a batch (``[task.call(...), ...]``): one broker round trip per queue and
        delay. Returns a `JobHandle` (a ``str``, the job id) per job, in order; the jobs
        of tasks with ``result_ttl`` get their records first (one store round trip).

        ``conn``: a connection of the application (asyncpg, or SQLAlchemy's
        ``AsyncConnection`` / ``AsyncSession``) in an open transaction, on a PostgreSQL
        broker: the jobs are written in that transaction, so they exist exactly when it
        commits. Any other broker: a `ConfigError`."""
        publish = self.broker.publish if conn is None else self._publish_in(conn)
        groups: dict[tuple[str, float], list[bytes]] = defaultdict(list)
        ids = []
        kept: list[tuple[JobHandle, float, float]] = []  # jobs with records: ttl, delay
        now = now_ms()
        producer = self.telemetry.producer(lambda: messaging_system(self.broker))
        holds = Holds(lambda: self.store)  # unique keys held by this batch (_unique.py)
        try:
            for call in calls:
                if self.enqueue_hooks:
                    call = await self._outgoing(call)  # with the hooks' headers
                queue, body, job_id = self._encode(call, now, producer)
                unique, unique_for = call.unique_key, call.unique_for
                if unique is not None and (held := await holds.hold(unique, unique_for, job_id)):
                    ids.append(JobHandle(held, app=self, task=call.task, queue=queue))
                    continue  # the key's job is in the system: it is the one returned
                groups[(queue, call.delay)].append(body)
                job = JobHandle(job_id, app=self, task=call.task, queue=queue)
                ids.append(job)
                task = self.tasks.get(call.task)
                if task is not None and task.result_ttl is not None:
                    kept.append((job, task.result_ttl, call.delay))
            if kept:
                await record_enqueued(self.store, kept)
            for (queue, delay), bodies in groups.items():
                await publish(queue, bodies, delay=delay)
                if producer is not None:
                    producer.published(queue, delay)
        except BaseException as exc:
            if producer is not None:
                producer.failed(exc)
            await holds.undo()
            raise
        return ids

    def _encode(
        self, call: Call, now: int, producer: Producer | None = None
    ) -> tuple[str, bytes, str]:
        task = self.tasks.get(call.task)
        args: Sequence[Any] = call.args
        kwargs = call.kwargs
        if task is not None:
            args, kwargs = task.encode_arguments(args, kwargs)  # typed: their JSON forms
            if call.key is not None and not task.idempotent:
                task.key_ignored()
        queue = call.queue or (task.queue if task is not None else None) or self.queue
        env = Envelope(
            id=new_id(),
            task=call.task,
            args=list(args),
            kwargs=kwargs,
            enqueued_at=now,
            eta=now + int(call.delay * 1000) if call.delay else None,
            key=call.key,
            headers=dict(call.headers) if call.headers else {},
        )
        if producer is not None:
            producer.start(queue, call.delay, env)  # its trace context goes into env.headers
        body = encode(env)
        if len(body) > self.max_message_size:
            raise ValueError(
                f"job {call.task!r} is {len(body)} bytes, over max_message_size "
                f"{self.max_message_size}: pass a reference (a URL, a key) instead of the data"
            )
        return queue, body, env.id

    def _publish_in(self, conn: object) -> Callable[..., Awaitable[None]]:
        broker = self.broker
        if not isinstance(broker, TransactionalPublisher):
            raise ConfigError(
                f"enqueue(conn=...) writes jobs in the application's database transaction, "
                f"which needs a postgresql:// broker; this app's is {self.broker_name}"
            )
        return functools.partial(broker.publish_in, conn)
