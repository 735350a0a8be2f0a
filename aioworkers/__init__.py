"""aioworkers: asyncio-native background job workers.

Define ``async def`` tasks on an `App`, enqueue them, and run them with ``aioworkers run``
or ``async with app.worker():``. Delivery is at-least-once; failures retry with backoff
and end in a dead-letter queue.
"""

from .app import App, DeadLetterQueue
from .brokers.base import Broker, DeadLetter, Delivery, QueueDepth
from .consumers import Message, current_message
from .dependencies import Depends
from .errors import (
    AioworkersError,
    BrokerUnavailable,
    ConfigError,
    DecodeError,
    JobCancelled,
    JobFailed,
    LeaseLost,
    RateLimited,
    Reject,
    ResultUnavailable,
    Retry,
    Snooze,
)
from .handles import JobHandle, JobInfo
from .job import Job, current_job
from .push import push_app
from .serverless import lambda_handler
from .task import Call, Task
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AioworkersError",
    "App",
    "Broker",
    "BrokerUnavailable",
    "Call",
    "ConfigError",
    "DeadLetter",
    "DeadLetterQueue",
    "DecodeError",
    "Delivery",
    "Depends",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "JobInfo",
    "LeaseLost",
    "Message",
    "QueueDepth",
    "RateLimited",
    "Reject",
    "ResultUnavailable",
    "Retry",
    "Snooze",
    "Task",
    "Worker",
    "current_job",
    "current_message",
    "lambda_handler",
    "push_app",
]
