"""``aioworkers stats``: queue depths once (a table, or ``--json``), checked against
``--fail-if`` thresholds, or refreshed with rates every ``--watch`` seconds; with them what
the live workers counted (the worker registry, `_registry`): how many jobs they throttled."""

from __future__ import annotations

import argparse
import asyncio
import operator
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from .._registry import WorkerInfo, registry_for
from ..brokers.base import QueueDepth, Totals
from ..errors import ConfigError
from ..store import StoreUnavailable

if TYPE_CHECKING:
    from ..app import App

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
FIELDS = ("ready", "in_flight", "delayed", "dead", "backlog")
_THRESHOLD = re.compile(r"\s*([a-z_-]+)\s*(>=|<=|==|!=|>|<)\s*(\d+(?:\.\d+)?)\s*")


@dataclass(frozen=True)
class Threshold:
    """``--fail-if 'dead>0'``: holds when the field compares true with the number."""

    field: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.field}{self.op}{self.value:g}"

    def holds(self, depth: QueueDepth) -> bool:
        return _OPS[self.op](_field(depth, self.field), self.value)


def _field(depth: QueueDepth, name: str) -> int:
    return depth.ready + depth.delayed if name == "backlog" else int(getattr(depth, name))


def threshold(text: str) -> Threshold:
    """Parse ``NAME OP NUMBER`` (argparse type of ``--fail-if``)."""
    match = _THRESHOLD.fullmatch(text)
    name = match.group(1).replace("-", "_") if match else ""
    if match is None or name not in FIELDS:
        raise argparse.ArgumentTypeError(
            f"expected NAME OP NUMBER, NAME one of {', '.join(FIELDS)} and OP one of "
            f"{' '.join(_OPS)} (for example 'dead>0'), got {text!r}"
        )
    return Threshold(name, match.group(2), float(match.group(3)))


class Rates:
    """Per-second rates of one queue between two polls: ``enqueued`` and ``done`` from
    the broker's counters where it has them (`Totals`), ``failed`` (dead-lettered)
    and ``backlog`` (change of ready + delayed) from the depths."""

    NAMES = ("enqueued", "done", "failed", "backlog")

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, QueueDepth, dict[str, int] | None]] = {}

    def update(
        self, queue: str, depth: QueueDepth, totals: dict[str, int] | None
    ) -> dict[str, float | None]:
        now = time.monotonic()
        last = self._last.get(queue)
        self._last[queue] = (now, depth, totals)
        if last is None:
            return dict.fromkeys(self.NAMES)
        then, before, old = last
        dt = max(now - then, 1e-9)
        if totals is not None and old is not None:
            dead = max(totals["dead"] - old["dead"], 0)
            enqueued: float | None = max(totals["added"] - old["added"], 0) / dt
            done: float | None = max(totals["left"] - old["left"] - dead, 0) / dt
        else:
            dead = max(depth.dead - before.dead, 0)
            enqueued = done = None
        backlog = (depth.ready + depth.delayed - before.ready - before.delayed) / dt
        return {"enqueued": enqueued, "done": done, "failed": dead / dt, "backlog": backlog}


async def _poll(app: App, queue: str) -> tuple[QueueDepth, dict[str, int] | None]:
    depth = await app.stats(queue)
    broker = app.broker
    return depth, (await broker.totals(queue) if isinstance(broker, Totals) else None)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _trend(value: float | None) -> str:
    if value is None:
        return "-"
    arrow = "up" if value > 0.05 else "down" if value < -0.05 else "flat"
    return f"{arrow} {value:+,.1f}/s"


def _table(rows: dict[str, QueueDepth], rates: dict[str, dict[str, float | None]] | None) -> str:
    head = f"{'queue':<24} {'ready':>8} {'in_flight':>10} {'delayed':>8} {'dead':>8}"
    if rates is not None:
        head += f" {'enqueued/s':>11} {'done/s':>9} {'failed/s':>9}  backlog"
    lines = [head]
    for q, d in rows.items():
        line = f"{q:<24} {d.ready:>8} {d.in_flight:>10} {d.delayed:>8} {d.dead:>8}"
        if rates is not None:
            r = rates[q]
            line += (
                f" {_rate(r['enqueued']):>11} {_rate(r['done']):>9} {_rate(r['failed']):>9}"
                f"  {_trend(r['backlog'])}"
            )
        lines.append(line)
    return "\n".join(lines)


async def _live_workers(app: App) -> list[WorkerInfo] | None:
    """The live workers, or None when unknown: no state store (RabbitMQ, SQS without
    ``store=``), one that keeps no registry, or one that cannot be reached."""
    try:
        registry = registry_for(app.store)
        return None if registry is None else await registry.workers()
    except (ConfigError, StoreUnavailable):
        return None


def _workers_doc(found: list[WorkerInfo] | None, queues: Sequence[str]) -> dict[str, Any]:
    """``{"live": .., "throttled": .., "by_queue": {queue: ..}, "outcomes": {..}}``, every
    value None when unknown. Counts are since each live worker started. ``by_queue`` counts
    the workers that consume that queue alone: one on several queues is only in the totals."""
    if found is None:
        return dict.fromkeys(("live", "throttled", "by_queue", "outcomes"))
    by_queue = dict.fromkeys(queues, 0)
    outcomes: dict[str, int] = {}
    for info in found:
        if len(info.queues) == 1 and info.queues[0] in by_queue:
            by_queue[info.queues[0]] += info.jobs_throttled
        for name, n in info.outcomes.items():
            outcomes[name] = outcomes.get(name, 0) + n
    throttled = sum(info.jobs_throttled for info in found)
    return {"live": len(found), "throttled": throttled, "by_queue": by_queue, "outcomes": outcomes}


def _workers_line(doc: dict[str, Any]) -> str:
    if doc["live"] is None:
        return "workers: throttled unknown (no state store keeps a worker registry)"
    per_queue = ", ".join(f"{q} {n}" for q, n in doc["by_queue"].items())
    return f"workers: {doc['live']} live, {doc['throttled']} throttled ({per_queue})"


def _check(rows: dict[str, QueueDepth], thresholds: Sequence[Threshold]) -> list[str]:
    return [
        f"{t} holds on queue {q!r} ({t.field}={_field(d, t.field)})"
        for q, d in rows.items()
        for t in thresholds
        if t.holds(d)
    ]


async def stats(app: App, queues: Sequence[str], args: argparse.Namespace) -> int:
    """``aioworkers stats``: 0, or 1 when a ``--fail-if`` threshold holds."""
    thresholds: list[Threshold] = args.fail_if or []
    if args.watch is not None:
        if thresholds:
            raise ConfigError("--fail-if checks once: use it without --watch (e.g. from cron)")
        return await _watch(app, queues, args)
    rows = {q: await app.stats(q) for q in queues}
    workers = _workers_doc(await _live_workers(app), queues)
    if args.json:
        # The shape of a --watch refresh: rates need two polls, so here they are unknown.
        rates = dict.fromkeys(Rates.NAMES)
        print(_json_line(rows, dict.fromkeys(queues, rates), workers))
    else:
        print(f"{_workers_line(workers)}\n{_table(rows, None)}")
    alerts = _check(rows, thresholds)
    for alert in alerts:
        print(f"aioworkers: threshold {alert}", file=sys.stderr)
    return 1 if alerts else 0


def _now() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="seconds")


def _json_line(
    rows: dict[str, QueueDepth],
    rates: dict[str, dict[str, float | None]],
    workers: dict[str, Any],
) -> str:
    """``stats --json``, with or without ``--watch``: ``{"ts": .., "queues": {queue:
    {"ready": .., "in_flight": .., "delayed": .., "dead": .., "rates": {..}}}, "workers":
    {"live": .., "throttled": .., "by_queue": {..}, "outcomes": {..}}}`` (`_workers_doc`)."""
    queues = {q: asdict(depth) | {"rates": rates[q]} for q, depth in rows.items()}
    return orjson.dumps({"ts": _now(), "queues": queues, "workers": workers}).decode()


async def _watch(app: App, queues: Sequence[str], args: argparse.Namespace) -> int:
    rates = Rates()
    in_place = sys.stdout.isatty() and not args.json
    refreshes = 0
    while True:
        rows: dict[str, QueueDepth] = {}
        per_queue: dict[str, dict[str, float | None]] = {}
        for q in queues:
            depth, totals = await _poll(app, q)
            rows[q] = depth
            per_queue[q] = rates.update(q, depth, totals)
        stamp = _now()
        workers = _workers_doc(await _live_workers(app), queues)
        if args.json:
            print(_json_line(rows, per_queue, workers), flush=True)
        else:
            header = f"{app.broker_name}  {stamp}  every {args.watch:g}s (Ctrl-C to stop)"
            prefix = "\x1b[H\x1b[2J" if in_place else ("\n" if refreshes else "")
            table = _table(rows, per_queue)
            print(f"{prefix}{header}\n{_workers_line(workers)}\n{table}", flush=True)
        refreshes += 1
        if args.count and refreshes >= args.count:
            return 0
        await asyncio.sleep(args.watch)
