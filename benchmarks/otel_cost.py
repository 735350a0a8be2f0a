"""What OpenTelemetry instrumentation costs per job, counted in CPU instructions.

    python benchmarks/otel_cost.py [--modes none,off,metrics,traces,all,sampled,upstream]
        [--small 1000] [--large 3000] [--jobs 2] [--url redis://127.0.0.1:6379/0]
        [--out benchmarks/results]

Why instructions: wall-clock and CPU-time figures on a shared 2-core machine move by
about 10 % between identical runs, so `run.py --otel` cannot resolve a difference of a
few percent. ``valgrind --tool=callgrind`` counts the instructions a process executes,
which is (nearly) deterministic: identical runs agree to ~0.2 %, loaded machine or
not (a few hundred instructions/job with the sizes 2,000 jobs apart). It counts
user space only, of the worker process and all its threads (the batch span processor's
exporter thread included): the Redis server and the kernel's work for the worker's
syscalls are not counted. That is what we want here, since every cost of telemetry is
Python code running in the worker; it also means the figures are a cost per job in the
worker, not a throughput.

Why two sizes: a run also counts the interpreter's start-up, the imports, building the
app and the providers, and shutting down, none of which depends on the number of jobs.
Each mode runs twice, on ``--small`` and ``--large`` pre-enqueued jobs, and
instructions/job = (I(large) - I(small)) / (large - small): the fixed part cancels. So
does the warm-up of the first ~200 jobs (the connection pools growing to the worker's
concurrency), as long as ``--small`` is at least that.

Each child is this script (``--child MODE N``) under valgrind: an `aioworkers.App` on the
Redis at ``--url`` consumes N jobs of the harness's W1 task (one ``INCR`` each,
`_child.Work.w1`) with a worker of concurrency 100, on uvloop when installed, with
``app.telemetry`` set for MODE before the worker is built, and stops once the N-th job is
done. The parent enqueues the jobs beforehand (natively, with telemetry disabled) so the
count is the worker's alone, and runs ``--jobs`` children at a time. Every key lives under
the run's prefix ``aiowcost-<pid>-<random>:`` and is deleted at the end.

Valgrind runs Python ~50x slower, so whatever is timed in seconds is widened (socket
timeouts, the visibility timeout, the depth poll interval: see `SOCKET_TIMEOUT`), and a
run counts only if it is clean: every job acked at its first attempt and nothing logged
at WARNING or above. A run that is not is tried again on fresh jobs, up to `ATTEMPTS`.

Results: a Markdown table (printed, and ``<out>/otel-cost.md``) and ``<out>/otel-cost.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import random
import re
import secrets
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

HERE = Path(__file__).resolve().parent
TASK = "w1"
QUEUE = "w1"
CONCURRENCY = 100
ENQUEUE_BATCH = 1000
# The first ~2 x concurrency jobs cost more (the worker's and the handler's Redis
# connection pools grow to the concurrency), so both runs must be past that.
MIN_SMALL = 2 * CONCURRENCY
# Under valgrind a wall-clock second holds ~50x less work than natively, so whatever is
# timed in seconds misfires or is overcounted: redis-py's 5 s socket timeouts expire while
# the loop is busy (the job fails and retries), leases lapse, and per-second work (lease
# extensions, queue depth polls) is counted as if jobs were 50x rarer, by an amount that
# varies with the machine's load. All are widened; none changes what a job executes.
SOCKET_TIMEOUT = 600.0
VISIBILITY = 600.0
DEPTH_INTERVAL = 3600.0
RESULT_TTL = 3600.0  # the ``results`` mode's task keeps its results this long
ATTEMPTS = 3  # a run that is not clean (see `clean_run`) is tried again, on fresh jobs
# What each mode configures; the order is the table's.
MODES: dict[str, str] = {
    "none": "no provider: the app's default `Telemetry()` (the API's no-op globals)",
    "off": "`Telemetry(enabled=False)`: aioworkers' instrumentation off",
    "metrics": "SDK `MeterProvider`, `InMemoryMetricReader`",
    "traces": "SDK `TracerProvider(ALWAYS_ON)`, `BatchSpanProcessor` into a discarding exporter",
    "all": "`metrics` + `traces`",
    "sampled": "`MeterProvider` + `TracerProvider(ParentBased(TraceIdRatioBased(0.1)))`, batch",
    "upstream": "`MeterProvider` + `TracerProvider(ParentBased(ALWAYS_OFF))`, batch: "
    "a span only under a traced producer (none in W1)",
    # Not telemetry: the same W1 for the cost of results (#14), and the raw loop (#20).
    "results": "no provider, the task with `result_ttl` (records at enqueue, start and end)",
    "raw": "not aioworkers: `benchmarks/_raw.py`'s redis.asyncio loop on the same jobs",
    # W0: the jobs do nothing (counted in-process): the framework's own cost per job.
    "w0": "`none`, the jobs no-ops (W0): the framework's own cost",
    "raw-w0": "`raw`, the jobs no-ops (W0)",
}
I_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


# -- child: one run under valgrind --------------------------------------------------------


def providers(mode: str) -> tuple[MeterProvider | None, TracerProvider | None]:
    """The SDK providers of ``mode`` (none for ``none``, ``off``, ``results``, ``raw``)."""
    if mode in ("none", "off", "results", "raw", "w0", "raw-w0"):
        return None, None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_OFF,
        ALWAYS_ON,
        ParentBased,
        Sampler,
        TraceIdRatioBased,
    )

    class Discard(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    samplers: dict[str, Sampler] = {
        "traces": ALWAYS_ON,
        "all": ALWAYS_ON,
        "sampled": ParentBased(TraceIdRatioBased(0.1)),
        "upstream": ParentBased(ALWAYS_OFF),
    }
    meter_provider = None
    if mode in ("metrics", "all", "sampled", "upstream"):
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    tracer_provider = None
    if mode in samplers:
        tracer_provider = TracerProvider(sampler=samplers[mode])
        tracer_provider.add_span_processor(BatchSpanProcessor(Discard()))
    return meter_provider, tracer_provider


class Tally(logging.Handler):
    """Every warning or error logged: a job that failed, retried or lost its lease ran
    other code than a clean one, so its run is not a measurement."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.first) < 3:
            self.first.append(f"{record.name}: {record.getMessage()}"[:300])


async def consume(mode: str, jobs: int, url: str, prefix: str, limit: float) -> dict[str, Any]:
    """Run a worker over the ``jobs`` jobs enqueued under ``prefix`` until all are done
    (or ``limit`` seconds have passed)."""
    import redis.asyncio as aioredis
    from _child import Spec, Work

    import aioworkers
    from aioworkers.telemetry import Telemetry

    tally = Tally()
    logging.getLogger().addHandler(tally)
    spec = Spec(
        workload="W1",
        task=TASK,
        redis_url=url,
        queue=QUEUE,
        counter=f"{prefix}:count",
        target=jobs,
        concurrency=CONCURRENCY,
        timeout=limit,
        broker_url=broker_url(url, prefix),
    )
    client = aioredis.from_url(
        url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT
    )
    work = Work(spec, client)
    if mode in ("w0", "raw-w0"):
        work.handlers["w1"] = work.w0  # the W1 jobs, run as no-ops
    if mode in ("raw", "raw-w0"):
        return await consume_raw(spec, work, client, tally, limit)
    app = aioworkers.App(
        spec.broker_url, queue=QUEUE, concurrency=CONCURRENCY, visibility_timeout=VISIBILITY
    )
    app.task(TASK, result_ttl=RESULT_TTL if mode == "results" else None)(work.handlers["w1"])
    meter_provider, tracer_provider = providers(mode)
    if mode in ("none", "results", "w0"):
        app.telemetry = Telemetry()
    else:
        app.telemetry = Telemetry(
            meter_provider=meter_provider,
            tracer_provider=tracer_provider,
            depth_interval=DEPTH_INTERVAL,
            enabled=mode != "off",
        )
    # Whether to instrument is decided when the worker is built: after the telemetry.
    worker = app.worker(concurrency=CONCURRENCY)
    t0 = time.perf_counter()
    running = asyncio.create_task(worker.run())
    finished = asyncio.ensure_future(work.done.wait())
    await asyncio.wait({finished, running}, timeout=limit, return_when="FIRST_COMPLETED")
    elapsed = time.perf_counter() - t0
    worker.stop()
    finished.cancel()
    await running
    await app.aclose()
    # Export what the batch processor still holds: that cost is telemetry's too.
    if tracer_provider is not None:
        tracer_provider.shutdown()
    if meter_provider is not None:
        meter_provider.shutdown()
    count = work.count or int(await client.get(spec.counter) or 0)
    await client.aclose()
    return {
        "mode": mode,
        "jobs": jobs,
        "count": count,
        "outcomes": {k: v for k, v in worker.counts.items() if v},
        "warnings": tally.count,
        "first_warnings": tally.first,
        "elapsed": elapsed,
        "gc": [g["collections"] for g in gc.get_stats()],
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
    }


async def consume_raw(
    spec: Any, work: Any, client: Any, tally: Tally, limit: float
) -> dict[str, Any]:
    """`consume` for the raw loop (`_raw.RawRedis`), reading the stream aioworkers would."""
    from _raw import GROUP, RawRedis

    # The broker's key for the queue (`RedisBroker.keys`), under the run's prefix.
    spec = replace(spec, stream=f"{spec.counter.rsplit(':', 1)[0]}:aio:{{{QUEUE}}}:stream")
    await client.xgroup_create(spec.stream, GROUP, "0", mkstream=True)
    side = RawRedis(spec, work)
    side.client = aioredis_client(spec.redis_url)
    t0 = time.perf_counter()
    running = await side.start()
    finished = asyncio.ensure_future(work.done.wait())
    await asyncio.wait({finished, running}, timeout=limit, return_when="FIRST_COMPLETED")
    elapsed = time.perf_counter() - t0
    finished.cancel()
    await side.stop()
    count = work.count or int(await client.get(spec.counter) or 0)
    await client.aclose()
    return {
        "mode": "raw",
        "jobs": spec.target,
        "count": count,
        "outcomes": {"ok": count},
        "warnings": tally.count,
        "first_warnings": tally.first,
        "elapsed": elapsed,
        "gc": [g["collections"] for g in gc.get_stats()],
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
    }


def aioredis_client(url: str) -> Any:
    import redis.asyncio as aioredis

    return aioredis.from_url(
        url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT
    )


def clean_run(result: dict[str, Any]) -> bool:
    """Every job done once, acked at the first attempt, nothing logged."""
    jobs = result["jobs"]
    return result["count"] == jobs and result["outcomes"] == {"ok": jobs} and not result["warnings"]


def child(mode: str, jobs: int, url: str, prefix: str) -> None:
    from _child import run

    # The sampled mode's trace ids come from `random`: the same ones, so the same
    # sampling decisions, in every run.
    random.seed(0)
    # Under valgrind Python runs ~50x slower: about 100 jobs/s.
    limit = 120 + jobs * 0.2
    result = run(consume(mode, jobs, url, prefix, limit), use_uvloop=True)
    print("RESULT " + json.dumps(result), flush=True)
    sys.exit(0 if clean_run(result) else 1)


# -- parent -------------------------------------------------------------------------------


@dataclass
class Run:
    mode: str
    jobs: int
    prefix: str  # of this run's keys; an attempt's are under ``<prefix>-<attempt>:``
    instructions: int = 0
    seconds: float = 0.0
    attempts: int = 0
    loop: str = ""
    gc: list[int] | None = None  # collections per generation, over the child's life


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


def broker_url(url: str, prefix: str) -> str:
    timeout = str(SOCKET_TIMEOUT)
    return with_query(
        url, prefix=f"{prefix}:aio", socket_timeout=timeout, socket_connect_timeout=timeout
    )


async def enqueue(url: str, prefix: str, jobs: int, mode: str = "none") -> None:
    """Put ``jobs`` W1 jobs where a child given ``prefix`` reads them (with ``results``,
    their records too, as an app whose task keeps results writes them)."""
    import aioworkers
    from aioworkers.telemetry import Telemetry

    app = aioworkers.App(broker_url(url, prefix), queue=QUEUE)
    # No telemetry on the producer: the jobs carry no trace context, in every mode.
    app.telemetry = Telemetry(enabled=False)

    @app.task(TASK, result_ttl=RESULT_TTL if mode == "results" else None)
    async def w1(i: int) -> None:  # only its name and arguments are enqueued here
        pass

    for start in range(0, jobs, ENQUEUE_BATCH):
        stop = min(jobs, start + ENQUEUE_BATCH)
        await app.enqueue_many(w1.call(i) for i in range(start, stop))
    await app.aclose()


async def clean(url: str, prefix: str) -> int:
    """Delete every key under ``prefix:`` (and nothing else)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        return len(keys)
    finally:
        await client.aclose()


async def redis_version(url: str) -> str:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        return str((await client.info("server")).get("redis_version"))
    finally:
        await client.aclose()


def callgrind(r: Run, url: str, prefix: str) -> tuple[int | None, dict[str, Any] | None, str]:
    """One child under callgrind: its instruction count, its RESULT and its output."""
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        r.mode,
        str(r.jobs),
        "--url",
        url,
        "--prefix",
        prefix,
    ]
    # A fixed hash seed: dict and set layouts, and so the instructions, repeat exactly.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    found = I_REFS.search(proc.stderr)
    result = next(
        (json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
        None,
    )
    if proc.returncode != 0 or found is None or result is None:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        return None, result, f"exit {proc.returncode}:\n{tail}"
    return int(found.group(1).replace(",", "")), result, ""


def measure(r: Run, url: str) -> Run:
    """Fill in ``r``'s instruction count from its first clean run, on fresh jobs each try."""
    t0 = time.perf_counter()
    why = ""
    for attempt in range(1, ATTEMPTS + 1):
        r.attempts = attempt
        prefix = f"{r.prefix}-{attempt}"
        try:
            asyncio.run(enqueue(url, prefix, r.jobs, r.mode))
            instructions, result, why = callgrind(r, url, prefix)
        finally:
            asyncio.run(clean(url, prefix))
        if instructions is not None and result is not None:
            r.instructions = instructions
            r.loop = result["loop"]
            r.gc = result["gc"]
            r.seconds = time.perf_counter() - t0
            return r
        print(f"  {r.mode} x{r.jobs}: attempt {attempt} not clean, {why}", file=sys.stderr)
    raise RuntimeError(
        f"{r.mode} x{r.jobs}: no clean run in {ATTEMPTS} attempts (a loaded machine? try "
        f"--jobs 1); last: {why}"
    )


def run_all(runs: list[Run], url: str, parallel: int) -> None:
    # Longest first, so the last pair of children finishes together.
    order = sorted(runs, key=lambda r: (-r.jobs, r.mode))
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(measure, r, url) for r in order]
        try:
            for future in as_completed(futures):
                r = future.result()
                print(
                    f"  {r.mode:9} {r.jobs:6} jobs  {r.instructions:>16,} instructions"
                    f"  {r.seconds:5.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
        except BaseException:
            # The report needs every run: start no more (those running finish).
            pool.shutdown(cancel_futures=True)
            raise


def summarize(runs: list[Run], small: int, large: int) -> list[dict[str, Any]]:
    by = {(r.mode, r.jobs): r.instructions for r in runs}
    modes = [m for m in MODES if (m, small) in by]
    per_job = {m: (by[m, large] - by[m, small]) / (large - small) for m in modes}
    rows = []
    for m in modes:
        row: dict[str, Any] = {
            "mode": m,
            "configuration": MODES[m],
            "instructions_per_job": round(per_job[m]),
            # The intercept: start-up, imports and shutdown, whatever the job count.
            "fixed_instructions": round(by[m, small] - per_job[m] * small),
        }
        for base in ("off", "none"):
            if base in per_job:
                extra = per_job[m] - per_job[base]
                row[f"vs_{base}"] = round(extra)
                row[f"vs_{base}_ratio"] = round(extra / per_job[base], 4)
            else:
                row[f"vs_{base}"] = row[f"vs_{base}_ratio"] = None
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    # Against `off` when it ran, else against `none` (the results and raw modes).
    base = "off" if any(row["mode"] == "off" for row in rows) else "none"
    lines = [
        f"| mode | configuration | instructions/job | overhead vs {base} |",
        "|---|---|--:|--:|",
    ]
    for row in rows:
        if row[f"vs_{base}"] is None:
            vs_off = "—"
        else:
            vs_off = f"{row[f'vs_{base}']:+,} ({row[f'vs_{base}_ratio']:+.1%})"
        lines.append(
            f"| `{row['mode']}` | {row['configuration']} | {row['instructions_per_job']:,} "
            f"| {vs_off} |"
        )
    return "\n".join(lines)


def report(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    versions = " · ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    return (
        f"{meta['time']} · {meta['cpus']} CPUs · Python {meta['python']} · Redis "
        f"{meta['redis_server']} · {versions} · loop {meta['loop']} · aioworkers "
        f"{meta['git']}\n\n"
        f"W1 (one `INCR` per job), worker concurrency {CONCURRENCY}; instructions counted "
        f"by callgrind in the worker process, per job = (I({meta['large']:,}) - "
        f"I({meta['small']:,})) / {meta['large'] - meta['small']:,}; run in "
        f"{meta['seconds']:.0f} s.\n\n{table(rows)}\n"
    )


def collect_meta(args: argparse.Namespace, prefix: str, runs: list[Run]) -> dict[str, Any]:
    from _report import _git, _version

    valgrind = subprocess.run(["valgrind", "--version"], capture_output=True, text=True)
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/otel_cost.py", *sys.argv[1:]]),
        "small": args.small,
        "large": args.large,
        "modes": args.modes,
        "prefix": prefix,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "redis_server": asyncio.run(redis_version(args.url)),
        "versions": {
            name: _version(name)
            for name in ("redis", "uvloop", "opentelemetry-api", "opentelemetry-sdk")
        },
        "valgrind": valgrind.stdout.strip(),
        "git": _git(),
        "loop": ",".join(sorted({r.loop for r in runs})),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ",".join(MODES))
    p.add_argument("--small", type=int, default=1000, help="jobs in the smaller run")
    p.add_argument("--large", type=int, default=3000, help="jobs in the larger run")
    p.add_argument("--jobs", type=int, default=2, help="valgrind runs at a time")
    p.add_argument("--url", default="redis://127.0.0.1:6379/0", help="Redis (plain URL)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    p.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    p.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [m for m in args.modes if m not in MODES]:
        p.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if not MIN_SMALL <= args.small < args.large:
        # Below that, the runs differ in how far the connection pools grew, a cost the
        # difference would count as per job.
        p.error(f"need {MIN_SMALL} <= --small < --large (the pools warm up over ~200 jobs)")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    return args


def preflight(url: str) -> None:
    if shutil.which("valgrind") is None:
        sys.exit(
            "otel_cost.py: valgrind is not installed (it counts the instructions); "
            "install it, e.g. `apt-get install valgrind`"
        )
    try:
        asyncio.run(redis_version(url))
    except Exception as exc:
        sys.exit(f"otel_cost.py: cannot reach Redis at {url}: {exc}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.url, args.prefix)
        return
    preflight(args.url)
    t0 = time.perf_counter()
    prefix = f"aiowcost-{os.getpid()}-{secrets.token_hex(4)}"
    sizes = (args.small, args.large)
    runs = [Run(mode, n, f"{prefix}:{mode}-{n}") for mode in args.modes for n in sizes]
    print(
        f"{len(runs)} callgrind runs, {args.jobs} at a time (prefix {prefix})",
        file=sys.stderr,
        flush=True,
    )
    try:
        run_all(runs, args.url, args.jobs)
    finally:
        asyncio.run(clean(args.url, prefix))
    rows = summarize(runs, args.small, args.large)
    meta = collect_meta(args, prefix, runs)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    text = report(meta, rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "modes": rows, "runs": [asdict(r) for r in runs]}
    (args.out / "otel-cost.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "otel-cost.md").write_text(text)
    print(f"wrote {args.out / 'otel-cost.json'} and {args.out / 'otel-cost.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
