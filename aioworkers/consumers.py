"""Consumers: handlers for messages other systems publish (`App.consumer`, `Message`).

A consumer queue carries foreign bodies (JSON, text, an SNS envelope, Redis stream fields),
not aioworkers envelopes. Each delivery is decoded by the consumer's ``decode`` and run
through the same runtime as a task's job (leases, retries, DLQ, idempotency, telemetry):
see `aioworkers._runtime.foreign`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import orjson

from ._app_handlers import HandlerOptions
from .errors import AioworkersError, ConfigError

if TYPE_CHECKING:
    from .task import Task

__all__ = ["CONSUMER_PREFIX", "Consumer", "ConsumerOptions", "Message", "current_message"]

# The name a consumer's handler is registered under in `App.tasks` (never a task's queue).
CONSUMER_PREFIX = "consumer:"

EXCHANGE_TYPES = ("topic", "direct", "fanout", "headers")
Decode = Literal["json", "text", "bytes", "fields", "sns"] | Callable[[bytes], Any]
KeyFn = Callable[[Any, "Message"], "str | None"]


@dataclass(frozen=True, slots=True)
class Message:
    """One foreign message as the broker delivered it.

    ``id``: the broker's message id (stream entry id, AMQP message id or delivery tag, SQS
    MessageId); ``routing_key``: the AMQP routing key it was published with (None
    elsewhere); ``headers``: AMQP headers, SQS message attributes (string values) or, for
    Redis, nothing; ``delivery_count``: deliveries so far, this one included; ``attempt``:
    1-based, raised by each retry; ``body``: the raw bytes, exactly as published.
    """

    id: str
    queue: str
    body: bytes
    routing_key: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    delivery_count: int = 1
    attempt: int = 1

    def __repr__(self) -> str:
        return f"<Message {self.queue} {self.id} attempt={self.attempt}>"


_message: ContextVar[Message] = ContextVar("aioworkers_current_message")


def current_message() -> Message:
    """The foreign message the calling consumer handler runs; raises outside one."""
    try:
        return _message.get()
    except LookupError:
        raise AioworkersError("current_message() called outside a consumer handler") from None


def _sns(body: bytes) -> Any:
    doc = orjson.loads(body)
    # Raw message delivery off: SNS wraps the message; on: the body is the message itself.
    if isinstance(doc, dict) and doc.get("Type") == "Notification" and "Message" in doc:
        inner = doc["Message"]
        if not isinstance(inner, str):
            raise ValueError("SNS Message is not a string")
        return orjson.loads(inner)
    return doc


def _fields(body: bytes) -> dict[str, str]:
    doc = orjson.loads(body)
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise ValueError("not a map of stream fields")
    return doc


_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "json": orjson.loads,
    "text": lambda body: body.decode("utf-8"),
    "bytes": bytes,
    "fields": _fields,
    "sns": _sns,
}


@dataclass(frozen=True, slots=True)
class Consumer:
    """A registered consumer: its queue, decoder, AMQP binding and run-once key."""

    queue: str
    fn: Callable[..., Coroutine[Any, Any, Any]]
    decoder: Callable[[bytes], Any]
    task_name: str
    exchange: str | None = None
    exchange_type: str = "topic"
    routing_keys: tuple[str, ...] = ()
    idempotency_key: KeyFn | None = None


def _decoder(decode: Decode) -> Callable[[bytes], Any]:
    if callable(decode):
        return decode
    try:
        return _DECODERS[decode]
    except KeyError:
        names = ", ".join(sorted(_DECODERS))
        raise ConfigError(f"decode must be one of {names} or a callable, got {decode!r}") from None


def _caller(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Coroutine[Any, Any, Any]]:
    """The task function: ``fn(body)`` or ``fn(body, message)``, with the message current."""
    if not inspect.iscoroutinefunction(fn):
        raise ConfigError(f"consumer {fn.__name__!r} must be an async def")
    params = inspect.signature(fn).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_message = len(positional) >= 2

    async def consume(body: Any, message: Message) -> Any:
        _message.set(message)  # the job's own context: gone when the job ends
        if takes_message:
            return await fn(body, message)
        return await fn(body)

    consume.__name__ = fn.__name__
    return consume


class ConsumerOptions(HandlerOptions):
    """Mixed into `App`: ``@app.consumer`` and ``app.publish``."""

    queue: str
    tasks: dict[str, Task[Any, Any]]

    @property
    def consumers(self) -> dict[str, Consumer]:
        """The registered consumers, by queue."""
        found: dict[str, Consumer] | None = self.__dict__.get("_consumers")
        if found is None:
            found = self.__dict__["_consumers"] = {}
        return found

    def consumer(
        self,
        queue: str,
        *,
        decode: Decode = "json",
        exchange: str | None = None,
        exchange_type: str = "topic",
        routing_key: str | Sequence[str] | None = None,
        retries: int | None = 3,
        timeout: float | None = None,
        backoff: float | None = None,
        idempotency_key: KeyFn | None = None,
    ) -> Callable[[Callable[..., Coroutine[Any, Any, Any]]], Callable[..., Any]]:
        """Register ``async def fn(body[, message])`` for every message on ``queue`` (see
        README, "Consuming other systems' messages"). ``retries``, ``timeout`` and
        ``backoff`` as for `App.task`; ``idempotency_key(body, message)`` runs each key's
        message once to completion."""
        from .task import Task  # app imports this module: task's import stays lazy

        decoder = _decoder(decode)
        keys = (routing_key,) if isinstance(routing_key, str) else tuple(routing_key or ())
        if keys and exchange is None:
            raise ConfigError("routing_key needs exchange= (the exchange to bind the queue to)")
        if exchange_type not in EXCHANGE_TYPES:
            raise ConfigError(f"exchange_type must be one of {', '.join(EXCHANGE_TYPES)}")
        self.check_consumer_queue(queue)
        policy = self.task_policy(retries, backoff, None, timeout, 100)

        def register(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
            name = CONSUMER_PREFIX + queue
            task = Task(self, _caller(fn), name=name, queue=queue, policy=policy)  # type: ignore[arg-type]
            task.idempotent = idempotency_key is not None
            self.tasks[name] = task
            self.consumers[queue] = Consumer(
                queue, fn, decoder, name, exchange, exchange_type, keys, idempotency_key
            )
            if exchange is not None and "_binding" not in self.__dict__:
                self.__dict__["_binding"] = True  # one hook binds every consumer's queue
                cast(Any, self).on_startup(self.bind_exchanges)
            return fn

        return register

    async def bind_exchanges(self) -> None:
        """Declare each consumer's exchange and bind its queue (a worker, at start)."""
        from .brokers.amqp import AmqpBroker

        broker = cast(Any, self).broker
        for c in self.consumers.values():
            if c.exchange is None:
                continue
            if not isinstance(broker, AmqpBroker):
                raise ConfigError(f"consumer {c.queue!r}: exchange= needs an amqp:// broker")
            await broker.bind(c.queue, c.exchange, c.exchange_type, c.routing_keys)

    def check_consumer_queue(self, queue: str) -> None:
        """A queue is a task queue or a consumer queue, never both."""
        if queue in self.consumers:
            raise ConfigError(f"queue {queue!r} already has a consumer")
        tasks = [t for t in self.tasks.values() if not t.name.startswith(CONSUMER_PREFIX)]
        if queue == self.queue or any(t.queue == queue for t in tasks):
            raise ConfigError(
                f"queue {queue!r} is a task queue; a consumer needs a queue of its own"
            )

    def check_task_queue(self, queue: str | None) -> None:
        """Raise if a task is registered on a consumer's queue."""
        if (queue or self.queue) in self.consumers:
            raise ConfigError(f"queue {queue or self.queue!r} is a consumer's queue")

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes | str,
        *,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish a plain message to a RabbitMQ exchange, confirmed by the broker."""
        from .brokers.amqp import AmqpBroker  # aio-pika: only when publishing to an exchange

        broker = cast(Any, self).broker
        if not isinstance(broker, AmqpBroker):
            raise ConfigError("app.publish(exchange, ...) needs a RabbitMQ (amqp://) broker")
        raw = body.encode() if isinstance(body, str) else body
        await broker.publish_to(exchange, routing_key, raw, headers=dict(headers or {}))
