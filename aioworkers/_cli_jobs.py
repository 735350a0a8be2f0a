"""``aioworkers job MODULE:ATTR ID [--json]`` (a job's status, record, and its result or
error, read from the state store) and ``aioworkers cancel MODULE:ATTR ID``."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

import orjson

from .app import App
from .errors import JobCancelled, JobFailed, ResultUnavailable, printable
from .handles import result_of

# Exit codes: 0 the job is known (job) or was cancelled (cancel); 1 it is not / was not.
NOT_FOUND = 1


def add_parsers(command: Any) -> None:
    """Register the commands (``command`` is the CLI's parser factory)."""
    job = command("job", "show a job: status, record, and its result or error")
    job.add_argument("id", help="the job id (what enqueue returned)")
    job.add_argument("--json", action="store_true", help="print JSON")
    cancel = command(
        "cancel", "cancel a job: queued or delayed, it never starts; running, it stops"
    )
    cancel.add_argument("id", help="the job id")


async def cmd_job(app: App, args: argparse.Namespace) -> int:
    handle = app.job(args.id)
    info = await handle.info()
    doc: dict[str, Any] = {
        "id": info.id,
        "task": info.task,
        "queue": info.queue,
        "status": info.status,
        "attempt": info.attempt,
        "enqueued_at": _iso(info.enqueued_at),
        "started_at": _iso(info.started_at),
        "finished_at": _iso(info.finished_at),
        "error_type": info.error_type,
        "error": info.error,
    }
    record = await app.store.get_job(args.id) if info.status != "unknown" else None
    if record is not None and record.final:
        try:
            doc["result"] = result_of(record)
        except JobFailed as exc:
            doc["traceback"] = exc.traceback or None
        except (JobCancelled, ResultUnavailable) as exc:
            doc["result_unavailable"] = str(exc)
    if args.json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print(doc)
    return 0 if info.status != "unknown" else NOT_FOUND


def _print(doc: dict[str, Any]) -> None:
    if doc["status"] == "unknown":
        print(
            f"job {printable(doc['id'])}: unknown (no record: an id never enqueued, a task "
            "without result_ttl, or its record expired)"
        )
        return
    for name, value in doc.items():
        if value is None or name == "traceback":
            continue
        if name == "result":
            value = orjson.dumps(value).decode()
        # Everything but our own fields came from the job (its task's code or data).
        print(f"{name:<20}{printable(str(value), 2000)}")
    if doc.get("traceback"):
        print(doc["traceback"].rstrip())


async def cmd_cancel(app: App, args: argparse.Namespace) -> int:
    job_id = printable(args.id)
    if await app.cancel(args.id):
        print(f"cancelled job {job_id}")
        return 0
    print(f"job {job_id} had finished, or is unknown: nothing cancelled", file=sys.stderr)
    return NOT_FOUND


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


__all__ = ["add_parsers", "cmd_cancel", "cmd_job"]
