"""``aioworkers schedules MODULE:ATTR [--json]``: each periodic schedule of the app, its
expression and time zone, its next slot, and the last slot decided with its outcome
(read from the state store: one read per schedule)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from ._runtime.clock import SYSTEM_CLOCK
from ._runtime.cron import STATE, Periodic
from .app import App
from .errors import ConfigError
from .periodic import Schedule


def add_parser(command: Any) -> None:
    """Register the command (``command`` is the CLI's parser factory)."""
    p = command("schedules", "show the periodic schedules: next slot, last slot and outcome")
    p.add_argument("--json", action="store_true", help="print JSON")


async def cmd_schedules(app: App, args: argparse.Namespace) -> int:
    rows = [await _row(app, s) for s in app.schedules.values()]
    if args.json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if not rows:
        print("no schedules registered (@app.periodic)")
        return 0
    header = ("SCHEDULE", "TASK", "WHEN", "TZ", "NEXT", "LAST", "OUTCOME")
    table = [header] + [
        (
            r["name"],
            r["task"],
            r["expression"],
            r["tz"],
            r["next"] or "-",
            r["last"] or "-",
            r["outcome"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    return 0


async def _row(app: App, schedule: Schedule) -> dict[str, Any]:
    now = SYSTEM_CLOCK.time()
    upcoming = schedule.next_slot(now)
    state: dict[str, Any] | None = None
    try:
        state = await Periodic([], app.store, _no_enqueue, SYSTEM_CLOCK).read_state(schedule)
    except ConfigError:
        state = None  # no store (RabbitMQ, SQS without store=): nothing was recorded
    last = state.get("slot") if state else None
    return {
        "name": schedule.name,
        "task": schedule.task,
        "expression": schedule.expression,
        "cron": schedule.cron,
        "every": schedule.every,
        "tz": schedule.tz,
        "overlap": schedule.overlap,
        "catchup": schedule.catchup,
        "next": _iso(upcoming),
        "last": _iso(last / 1000) if isinstance(last, int) else None,
        "outcome": state.get("outcome") if state else None,
        "job": state.get("job") if state else None,
        "record": STATE + schedule.name,
    }


async def _no_enqueue(call: Any) -> str:
    raise AssertionError("the schedules command enqueues nothing")


def _iso(slot: float | None) -> str | None:
    return None if slot is None else datetime.fromtimestamp(slot, UTC).isoformat()
