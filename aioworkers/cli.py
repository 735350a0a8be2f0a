"""The command line: ``aioworkers run | enqueue | stats | dlq | migrate | web``.

The CLI owns the process: it installs the signal handlers and the event loop, then calls
the same `Worker.run()` an embedding service calls.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from . import __version__, _cli_jobs, _cli_schedules, monitor, supervisor
from ._cli_args import count as _count
from ._cli_args import csv as _csv
from ._cli_args import json_of as _json
from ._cli_args import level as _level
from ._cli_args import megabytes as _megabytes
from ._cli_args import port as _port
from ._cli_args import positive_int as _positive_int
from ._cli_args import positive_seconds as _positive_seconds
from ._cli_args import seconds as _seconds
from ._cli_checks import (
    UsageError,
    _note_unknown_queues,
    _require_queue_file,
    _require_shared_broker,
    _warn_private_broker,
)
from ._cli_dlq import cmd_dlq
from .app import App
from .errors import AioworkersError, ConfigError, redact
from .worker import Worker

log = logging.getLogger("aioworkers")

# The name to install it by ("aioworkers" on PyPI is another project).
DISTRIBUTION = "aio-job-workers"


class ImportFailed(UsageError):
    """The user's module raised while it was imported: its traceback, then one line."""

    def __init__(self, message: str, user_traceback: str) -> None:
        super().__init__(message)
        self.user_traceback = user_traceback


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line that says what to fix, instead of argparse's usage dump.
        raise UsageError(f"{message} (see '{self.prog} --help')")


def load_app(spec: str) -> App:
    """Import ``MODULE:ATTR`` (the current directory is importable) and check it is an App."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected MODULE:ATTR (for example myapp:app), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            raise UsageError(
                f"cannot import module {module_name!r}: run from the directory that holds it "
                "or add it to PYTHONPATH"
            ) from None
        raise _import_failed(module_name, exc) from None
    except Exception as exc:
        raise _import_failed(module_name, exc) from None
    try:
        app = getattr(module, attr)
    except AttributeError:
        apps = [name for name, value in vars(module).items() if isinstance(value, App)]
        hint = f"; App objects there: {', '.join(apps)}" if apps else ""
        raise UsageError(f"module {module_name!r} has no attribute {attr!r}{hint}") from None
    if not isinstance(app, App):
        raise UsageError(f"{spec} is a {type(app).__name__}, not an aioworkers.App")
    return app


_OWN_FILES = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _import_failed(module_name: str, exc: Exception) -> ImportFailed:
    """The error of a user's module that raised on import, with the traceback of its own
    code: the frames of aioworkers and of the import machinery are left out."""
    report = traceback.TracebackException.from_exception(exc)
    _trim(report)
    return ImportFailed(
        f"importing {module_name!r} failed: {type(exc).__name__}: {exc} (traceback above)",
        "".join(report.format()),
    )


def _trim(report: traceback.TracebackException) -> None:
    report.stack = traceback.StackSummary.from_list(
        [frame for frame in report.stack if _users(frame.filename)]
    )
    for chained in (report.__cause__, report.__context__):
        if chained is not None:
            _trim(chained)


def _users(filename: str) -> bool:
    internal = filename.startswith(_OWN_FILES) or filename.startswith("<frozen importlib")
    return not internal and filename != importlib.__file__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aioworkers", description="asyncio background job workers")
    parser.add_argument(
        "--version", action="version", version=f"aioworkers {__version__} ({DISTRIBUTION})"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("app", metavar="MODULE:ATTR", help="the App, e.g. myapp:app")
        p.add_argument("--broker", metavar="URL", help="broker URL (overrides the app's)")
        p.add_argument("--log-level", default="INFO", type=_level, help="default INFO")
        p.add_argument("--log-format", default="text", choices=monitor.LOG_FORMATS)
        return p

    run = command("run", "run a worker until SIGTERM/SIGINT (twice: stop now)")
    run.add_argument("--queues", type=_csv, help="comma-separated (default: the app's)")
    run.add_argument("--concurrency", type=_positive_int, help="jobs in flight at most")
    run.add_argument("--grace", type=_seconds, help="seconds to finish jobs on shutdown")
    run.add_argument(
        "--burst",
        action="store_true",
        help="exit once nothing is ready or in flight (delayed jobs are left, and counted)",
    )
    run.add_argument(
        "--wait-delayed",
        action="store_true",
        help="with --burst: also wait for delayed jobs and retries in backoff",
    )
    run.add_argument("--no-scheduler", action="store_true", help="fire no periodic jobs here")
    run.add_argument(
        "--priority",
        choices=("fair", "strict"),
        default="fair",
        help="strict: fill slots from the first of --queues first (default fair)",
    )
    # Monitoring (issue 6): Prometheus /metrics and /healthz, OTLP export.
    run.add_argument("--metrics-port", type=_port, help="serve /metrics and /healthz on PORT")
    run.add_argument("--metrics-host", default="127.0.0.1", help="default 127.0.0.1")
    run.add_argument("--otlp", action="store_true", help="export via OTLP (OTEL_* env vars)")
    # Deployment (issue 7): several processes under a supervisor, recycled on limits.
    run.add_argument("--processes", type=_count, help="worker processes (0: one per CPU)")
    run.add_argument("--max-jobs-per-child", type=_positive_int, help="recycle after N jobs")
    run.add_argument("--max-memory-per-child", type=_megabytes, help="recycle past MB resident")
    run.add_argument("--max-job-seconds", type=_positive_seconds, help="default task timeout")

    enqueue = command("enqueue", "enqueue one job")
    enqueue.add_argument("task", help="registered task name")
    enqueue.add_argument("--args", type=_json(list), default=[], help="JSON array")
    enqueue.add_argument("--kwargs", type=_json(dict), default={}, help="JSON object")
    enqueue.add_argument("--delay", type=_seconds, default=0.0, help="seconds")
    enqueue.add_argument(
        "--key",
        help="idempotency key, only with a task registered idempotent=True: the first job "
        "with a key runs, later ones with it are acked unrun; other tasks just carry it",
    )
    enqueue.add_argument("--queue", help="queue (default: the task's)")
    enqueue.add_argument(
        "--create",
        action="store_true",
        help="sqlite://: create the queue file if it does not exist (else an error)",
    )

    stats = command("stats", "show ready, in-flight, delayed and dead jobs per queue")
    stats.add_argument("--queues", type=_csv, help="comma-separated (default: the app's)")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument(
        "--watch",
        type=_positive_seconds,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) with rates",
    )
    stats.add_argument("--count", type=_positive_int, help="with --watch: stop after N")
    stats.add_argument(
        "--fail-if",
        type=monitor.threshold,
        action="append",
        metavar="EXPR",
        help="exit 1 if e.g. 'dead>0' or 'ready>1000' holds on a queue (repeatable)",
    )

    command("migrate", "create or upgrade the broker's tables (postgresql://), then exit")

    web = command(
        "web",
        f"serve the dashboard ({DISTRIBUTION}[web]); login from AIOWORKERS_WEB_USER and "
        "AIOWORKERS_WEB_PASSWORD, or AIOWORKERS_WEB_TOKEN",
    )
    web.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    web.add_argument("--port", type=_port, default=8080, help="default 8080")
    web.add_argument(
        "--read-only",
        action="store_true",
        help="no replay, purge or cancel; the only way to serve without a login (on loopback)",
    )
    web.add_argument("--show-args", action="store_true", help="show dead jobs' arguments")
    _cli_schedules.add_parser(command)
    _cli_jobs.add_parsers(command)

    dlq = sub.add_parser("dlq", help="list, replay or purge dead letters")
    dlq_sub = dlq.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for action, text in (
        ("list", "list dead letters"),
        ("replay", "enqueue dead letters again as first attempts"),
        ("purge", "delete dead letters"),
    ):
        p = dlq_sub.add_parser(action, help=text, description=text)
        p.add_argument("app", metavar="MODULE:ATTR", help="the App, e.g. myapp:app")
        p.add_argument("--broker", metavar="URL", help="broker URL (overrides the app's)")
        p.add_argument("--log-level", default="WARNING", type=_level)
        p.add_argument("--log-format", default="text", choices=monitor.LOG_FORMATS)
        p.add_argument(
            "--queue", type=_csv, help="comma-separated queues (default: every queue of the app)"
        )
        if action == "list":
            p.add_argument("--limit", type=_positive_int, default=100)
            p.add_argument("--json", action="store_true", help="print JSON")
        if action == "replay":
            p.add_argument("--ids", type=_csv, help="job ids (default: all)")
    return parser


# -- commands ------------------------------------------------------------------------------


async def cmd_run(app: App, args: argparse.Namespace) -> int:
    # Before the worker: it checks once whether a telemetry provider is set.
    exporters = monitor.Exporters.from_args(args)
    worker = app.worker(
        concurrency=args.concurrency,
        queues=args.queues,
        grace=args.grace,
        max_jobs=args.max_jobs_per_child,
        job_timeout=args.max_job_seconds,
        scheduler=not args.no_scheduler,
        priority=args.priority,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, worker, sig)
    watch = asyncio.create_task(
        supervisor.watch_child(worker, max_memory_mb=args.max_memory_per_child)
    )
    exporters.watch(app, worker)
    try:
        await worker.run(burst=args.burst, wait_delayed=args.wait_delayed)
    finally:
        watch.cancel()
        exporters.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return supervisor.RECYCLE_EXIT if worker.recycled else 0


def _on_signal(worker: Worker, sig: signal.Signals) -> None:
    if worker.state in ("RUNNING", "IDLE"):
        log.info("%s: draining %d jobs (send again to stop now)", sig.name, worker.in_flight)
    worker.stop()


async def cmd_enqueue(app: App, args: argparse.Namespace) -> int:
    _require_shared_broker(app, "enqueue")
    if not args.create:
        _require_queue_file(app)
    if app.tasks and args.task not in app.tasks:
        raise UsageError(f"unknown task {args.task!r}; registered: {', '.join(sorted(app.tasks))}")
    try:
        job_id = await app.enqueue(
            args.task, args.args, args.kwargs, delay=args.delay, key=args.key, queue=args.queue
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(job_id)
    return 0


async def cmd_migrate(app: App, args: argparse.Namespace) -> int:
    applied = await app.migrate()
    if applied:
        print(f"applied migrations {', '.join(map(str, applied))} to {app.broker_name}")
    else:
        print(f"nothing to migrate on {app.broker_name}")
    return 0


async def cmd_stats(app: App, args: argparse.Namespace) -> int:
    if args.count is not None and args.watch is None:
        raise UsageError("--count needs --watch: it stops after that many refreshes")
    _warn_private_broker(app)
    _note_unknown_queues(app, args.queues)
    return await monitor.stats(app, args.queues or app.queues(), args)


async def cmd_web(app: App, args: argparse.Namespace) -> int:
    try:
        from .web._serve import serve
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    _warn_private_broker(app)
    return await serve(
        app, host=args.host, port=args.port, read_only=args.read_only, show_args=args.show_args
    )


COMMANDS: dict[str, Callable[[App, argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "run": cmd_run,
    "enqueue": cmd_enqueue,
    "stats": cmd_stats,
    "dlq": cmd_dlq,
    "migrate": cmd_migrate,
    "schedules": _cli_schedules.cmd_schedules,
    "job": _cli_jobs.cmd_job,
    "cancel": _cli_jobs.cmd_cancel,
    "web": cmd_web,
}


async def _main(app: App, args: argparse.Namespace) -> int:
    async with app:
        return await COMMANDS[args.command](app, args)


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aioworkers`` console script; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        processes = supervisor.plan(args) if args.command == "run" else None
        # Several processes write to one stream: each line says which.
        several = processes is not None or supervisor.child_index() is not None
        monitor.configure_logging(args.log_level, args.log_format, pid=several)
        if processes is not None:
            raw = list(sys.argv[1:] if argv is None else argv)
            return supervisor.supervise(raw, processes, grace=args.grace)
        app = load_app(args.app)
        if args.broker is not None:
            app.set_broker(args.broker)  # an empty one is an error, not the default
        with _runner() as runner:
            code = 1
            try:
                code = runner.run(_main(app, args))
                return code
            except BaseExceptionGroup as group:
                # The worker's task groups wrap what one of its tasks raised: a bad
                # configuration found at run time (a file that is not a database) is
                # reported as one line, like one found at start-up.
                raise _single(group) from None
            finally:
                _exit_if_stuck(runner.get_loop(), code)
    except (UsageError, ConfigError) as exc:
        if isinstance(exc, ImportFailed):
            print(redact(exc.user_traceback), end="", file=sys.stderr)
        print(f"aioworkers: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except AioworkersError as exc:
        print(f"aioworkers: {type(exc).__name__}: {redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _exit_if_stuck(loop: asyncio.AbstractEventLoop, code: int) -> None:
    """Exit at once if a task ignores cancellation (a handler that swallows it, left running
    by the worker's second stop, its job left to its lease): closing the runner would wait
    for it forever."""
    left = asyncio.all_tasks(loop)
    if not left:
        return
    for task in left:
        task.cancel()
    _, stuck = loop.run_until_complete(asyncio.wait(left, timeout=1.0))
    if stuck:
        log.error("exiting with %d tasks that ignore cancellation", len(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one aioworkers error ``group`` holds, or ``group`` itself."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    ours = [exc for exc in leaves if isinstance(exc, AioworkersError)]
    return ours[0] if len(ours) == len(leaves) and ours else group


if __name__ == "__main__":
    sys.exit(main())
