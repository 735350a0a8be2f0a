"""Checks the commands share: a command line that cannot reach the worker's queue is
refused (or noted), never allowed to strand a job in a file or a process nobody reads."""

from __future__ import annotations

import sys

from .app import App
from .brokers import FileBacked, MessagingSystem


class UsageError(Exception):
    """A mistake on the command line: printed as one line, exit code 2."""


def _note_unknown_queues(app: App, queues: list[str] | None) -> None:
    """A queue no task names may be a typo, or one filled by ``enqueue --queue``: say so
    and show what the broker has."""
    known = app.queues()
    for queue in queues or ():
        if queue not in known:
            print(
                f"note: queue {queue!r} is unknown to the app (its queues: {', '.join(known)})",
                file=sys.stderr,
            )


def _in_process(app: App) -> bool:
    """The broker lives inside this process (memory://): nothing else can reach it."""
    broker = app.broker
    return isinstance(broker, MessagingSystem) and broker.messaging_system == "memory"


def _require_shared_broker(app: App, what: str) -> None:
    if _in_process(app):
        raise UsageError(
            f"the memory:// broker lives inside one process, so '{what}' from the command line "
            "cannot reach a worker: use a shared broker (--broker URL or AIOWORKERS_BROKER_URL)"
        )


def _warn_private_broker(app: App) -> None:
    if _in_process(app):
        print("note: memory:// is private to this process; these are its numbers", file=sys.stderr)
    # Reading must not create an empty file that says "nothing queued".
    _require_queue_file(app, hint="")


def _require_queue_file(app: App, hint: str = " (or --create to make a new one)") -> None:
    """A command run from another directory than the worker's must not create a file of
    its own: a job enqueued there would wait for a worker that never reads it."""
    broker = app.broker
    if isinstance(broker, FileBacked) and not broker.path.exists():
        raise UsageError(
            f"no queue file at {broker.path}: run this where the worker runs, or point both at "
            f"one file (--broker or AIOWORKERS_BROKER_URL=sqlite:////absolute/path.db){hint}"
        )
