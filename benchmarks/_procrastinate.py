"""The procrastinate side on PostgreSQL: the closest Python peer, doing the same jobs.

procrastinate 3 (psycopg 3) is not a dependency of aioworkers: install it for this
comparison only (``pip install -e '.[bench]'``, see benchmarks/README.md). The parent
(`run.py --broker postgres --sides raw,aioworkers,procrastinate`) applies procrastinate's
schema to the trial's database and defers the jobs with procrastinate's own API
(``batch_defer_async`` per 1000, W3: ``defer_async`` per job); this child runs a
procrastinate worker on them with the harness's concurrency, ``listen_notify`` on (an idle
worker wakes on its NOTIFY), ``delete_jobs="always"`` (finished rows deleted, as
aioworkers and the raw loop do) and, as they do, its fetches and finishes committed without
waiting for the WAL flush (``synchronous_commit=off`` on the worker's connections; the
parent's defers are durable commits, as every side's enqueues). The handlers are
`_child.Work`'s, so the work per job is the same on every side. Imports no part of
aioworkers.

    python benchmarks/_procrastinate.py '<spec json>'    (started by run.py)
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from collections.abc import Callable, Coroutine
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from _child import Spec, Work, main

POOL_SIZE = 10  # connections, as aioworkers' default pool_size


def make_app(url: str, *, async_commit: bool = False) -> Any:
    """A procrastinate App on ``url`` (``postgresql://...``), jobs' tasks not registered.
    ``async_commit``: its connections commit without waiting for the WAL flush (the
    worker's, as aioworkers' and the raw loop's fetches and acks do; never the producer's)."""
    import procrastinate

    options = {"options": "-c synchronous_commit=off"} if async_commit else {}
    connector = procrastinate.PsycopgConnector(
        conninfo=url, min_size=1, max_size=POOL_SIZE, kwargs=options
    )
    return procrastinate.App(connector=connector)


def register(app: Any, handlers: dict[str, Callable[..., Coroutine[Any, Any, None]]]) -> None:
    """Each handler as a procrastinate task of the same name, taking the job's arguments
    as the harness sends them (``args``: a list, as in aioworkers' envelope)."""
    for name, handler in handlers.items():

        async def run(args: list[Any], _handler: Any = handler) -> None:
            await _handler(*args)

        app.task(name=name, queue="default")(run)


class ProcrastinateWorker:
    def __init__(self, spec: Spec, work: Work) -> None:
        self.spec = spec
        self.app = make_app(spec.raw_url, async_commit=True)
        register(self.app, work.handlers)
        self.running: asyncio.Task[None] | None = None
        # Its info line per job on stderr is not part of the work measured.
        logging.getLogger("procrastinate").setLevel(logging.WARNING)

    async def start(self) -> asyncio.Task[None]:
        await self.app.open_async()
        self.running = asyncio.create_task(
            self.app.run_worker_async(
                queues=[self.spec.queue],
                concurrency=self.spec.concurrency,
                listen_notify=True,
                delete_jobs="always",
                install_signal_handlers=False,
                wait=True,
            )
        )
        return self.running

    async def stop(self) -> None:
        if self.running is not None:
            self.running.cancel()  # procrastinate's worker stops on cancel, jobs finished
            await asyncio.gather(self.running, return_exceptions=True)
        await self.app.close_async()


# (workload, metric, value of a record or None): the figures of the peer table.
_FIGURES: list[tuple[str, str, Callable[[dict[str, Any]], float | None]]] = [
    ("W0", "jobs/s, no-op counted in-process", lambda r: r["jobs"] / r["elapsed"]),
    ("W0", "worker CPU µs/job", lambda r: r["cpu"] / r["jobs"] * 1e6),
    ("W1", "jobs/s, one INCR each", lambda r: r["jobs"] / r["elapsed"]),
    ("W1", "worker CPU µs/job", lambda r: r["cpu"] / r["jobs"] * 1e6),
    ("W2", "efficiency, ideal / actual", lambda r: r["ideal"] / r["elapsed"]),
    ("W3", "p50 start - enqueued, ms", lambda r: r["latency_ms"].get("p50")),
    ("W3", "p99 start - enqueued, ms", lambda r: r["latency_ms"].get("p99")),
]
_SIDES = ("raw", "aioworkers", "procrastinate")


def _values(records: list[dict[str, Any]], workload: str, side: str, get: Any) -> list[float]:
    got = (
        get(r)
        for r in records
        if r["workload"] == workload and r["side"] == side and not r["error"] and not r["depth"]
    )
    return [x for x in got if x is not None]


def _cell(xs: list[float]) -> str:
    if not xs:
        return "—"
    fmt = "{:,.0f}" if max(xs) >= 100 else "{:.2f}"
    median = fmt.format(statistics.median(xs))
    return median if len(xs) == 1 else f"{median} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def _ratio(a: list[float], b: list[float]) -> str:
    if not a or not b or not statistics.median(b):
        return "—"
    return f"{statistics.median(a) / statistics.median(b):.2f}"


def peer_markdown(records: list[dict[str, Any]]) -> str:
    """The three sides of a postgres run side by side: medians (min-max over repeats), and
    aioworkers and procrastinate each as a ratio to the raw loop of the same run."""
    try:
        release = version("procrastinate")
    except PackageNotFoundError:
        release = "?"
    lines = [
        "",
        f"#### aioworkers and procrastinate {release} on postgres, same run",
        "",
        "Median over repeats (min-max); ratios of the medians to the raw loop's.",
        "",
        "| workload | metric | raw asyncpg | aioworkers | procrastinate | aioworkers / raw "
        "| procrastinate / raw |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for workload, metric, get in _FIGURES:
        raw, aio, peer = (_values(records, workload, side, get) for side in _SIDES)
        if not peer:
            continue
        lines.append(
            f"| {workload} | {metric} | {_cell(raw)} | {_cell(aio)} | {_cell(peer)} "
            f"| {_ratio(aio, raw)} | {_ratio(peer, raw)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(ProcrastinateWorker)
