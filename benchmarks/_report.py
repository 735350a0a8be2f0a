"""Turn the harness's records into summary rows, a Markdown table and a PNG chart."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

Record = dict[str, Any]
Row = dict[str, Any]
Check = Callable[[float | None, float | None, float | None], bool | None]

P99_TARGET_MS = 5.0
RAW_CLIENT = {
    "redis": "redis.asyncio",
    "amqp": "aio-pika",
    "sqs": "aiobotocore",
    "sqlite": "sqlite3",
}
RSS_GROWTH_TARGET = 1.10
# The most throughput telemetry may cost in W1, as 1 - jobs/s ratio to plain aioworkers:
# with an SDK provider configured, and with aioworkers' instrumentation off.
OTEL_OVERHEAD_TARGET = {"off": 0.02, "metrics": 0.10, "traces": 0.10, "all": 0.10, "sampled": 0.10}
OTEL_PROVIDERS = {
    "off": "none, Telemetry(enabled=False)",
    "metrics": "MeterProvider",
    "traces": "TracerProvider",
    "all": "MeterProvider + TracerProvider",
    "sampled": "MeterProvider + TracerProvider, 10 % of traces",
}
OTEL_WORKLOADS = {"W0": "W0 framework overhead", "W1": "W1 no-op throughput"}


def _rate(r: Record) -> float:
    return float(r["jobs"] / r["elapsed"])


def _cpu_us(r: Record) -> float:
    return float(r["cpu"] / r["jobs"] * 1e6)


def _efficiency(r: Record) -> float:
    return float(r["ideal"] / r["elapsed"])


def _latency(q: str) -> Callable[[Record], float | None]:
    def value(r: Record) -> float | None:
        got = r.get("latency_ms", {}).get(q)
        return None if got is None else float(got)

    return value


def _rss(r: Record) -> float:
    return float(r["maxrss_mb"])


def _median(
    records: list[Record],
    workload: str,
    side: str,
    value: Callable[[Record], float | None],
    depth: int,
) -> float | None:
    got = [
        value(r)
        for r in records
        if r["workload"] == workload
        and r["side"] == side
        and r["depth"] == depth
        and not r["error"]
    ]
    xs = [x for x in got if x is not None]
    return statistics.median(xs) if xs else None


def _row(
    records: list[Record],
    key: str,
    label: str,
    metric: str,
    value: Callable[[Record], float | None],
    *,
    fmt: str,
    depth: int = 0,
    target: str = "",
    check: Check | None = None,
) -> Row | None:
    workload = key.split(".")[0]
    if not any(r["workload"] == workload and r["depth"] == depth for r in records):
        return None
    raw = _median(records, workload, "raw", value, depth)
    aio = _median(records, workload, "aioworkers", value, depth)
    ratio = aio / raw if raw and aio is not None else None
    met = check(raw, aio, ratio) if check is not None and aio is not None else None
    return {
        "key": key,
        "label": label,
        "metric": metric,
        "raw": raw,
        "aioworkers": aio,
        "ratio": ratio,
        "target": target,
        "met": met,
        "fmt": fmt,
    }


def _growth(small: Row | None, large: Row | None, depths: tuple[int, int]) -> Row | None:
    if small is None or large is None:
        return None

    def grow(side: str) -> float | None:
        a, b = small[side], large[side]
        return b / a if a and b is not None else None

    aio = grow("aioworkers")
    return {
        "key": "RSS.growth",
        "label": "RSS flatness",
        "metric": f"peak RSS @{depths[1]:,} / @{depths[0]:,} queued",
        "raw": grow("raw"),
        "aioworkers": aio,
        "ratio": None,
        "target": f"aioworkers ≤ {RSS_GROWTH_TARGET:.2f}",
        "met": None if aio is None else aio <= RSS_GROWTH_TARGET,
        "fmt": "{:.3f}",
    }


def summarize(records: list[Record]) -> list[Row]:
    """Medians over repeats for each side, their ratio, and whether the issue's target
    (a ratio to the raw loop, or an absolute latency) was met."""
    depths = sorted({r["depth"] for r in records if r["workload"] == "RSS"})
    ideal = next((r["ideal"] for r in records if r["workload"] == "W2"), None)
    rows = [
        _row(
            records,
            "W0.rate",
            "W0 framework overhead",
            "jobs/s, no-op counted in-process",
            _rate,
            fmt="{:,.0f}",
        ),
        _row(
            records, "W0.cpu", "W0 framework overhead", "worker CPU µs/job", _cpu_us, fmt="{:.0f}"
        ),
        _row(
            records,
            "W1.rate",
            "W1 no-op throughput",
            "jobs/s, one INCR each",
            _rate,
            fmt="{:,.0f}",
            target="ratio ≥ 0.6 (goal 0.8)",
            check=lambda raw, aio, ratio: None if ratio is None else ratio >= 0.6,
        ),
        _row(records, "W1.cpu", "W1 no-op throughput", "worker CPU µs/job", _cpu_us, fmt="{:.0f}"),
        _row(
            records,
            "W2.efficiency",
            "W2 I/O-bound",
            f"efficiency, ideal {ideal or 0:.2f} s / actual",
            _efficiency,
            fmt="{:.2f}",
            target="ratio ≥ 0.8",
            check=lambda raw, aio, ratio: None if ratio is None else ratio >= 0.8,
        ),
        _row(
            records,
            "W3.p50",
            "W3 latency",
            "p50 start - enqueued, ms",
            _latency("p50"),
            fmt="{:.2f}",
        ),
        _row(
            records,
            "W3.p99",
            "W3 latency",
            "p99 start - enqueued, ms",
            _latency("p99"),
            fmt="{:.2f}",
            target=f"aioworkers ≤ {P99_TARGET_MS:.0f} ms (raw < 1 ms)",
            check=lambda raw, aio, ratio: aio is not None and aio <= P99_TARGET_MS,
        ),
        _row(records, "W1.rss", "Peak RSS", "MB, W1 worker process", _rss, fmt="{:.1f}"),
        # aioworkers alone (the raw loops have one queue and no retries): compare with W1.
        _row(records, "W4.rate", "W4 20 queues", "jobs/s, W1's jobs spread", _rate, fmt="{:,.0f}"),
        _row(records, "W4.cpu", "W4 20 queues", "worker CPU µs/job", _cpu_us, fmt="{:.0f}"),
        _row(records, "W5.rate", "W5 retries", "jobs/s, each fails once", _rate, fmt="{:,.0f}"),
        _row(records, "W5.cpu", "W5 retries", "worker CPU µs/job", _cpu_us, fmt="{:.0f}"),
    ]
    if len(depths) == 2:
        small = _row(
            records,
            "RSS.small",
            "Peak RSS",
            f"MB, {depths[0]:,} jobs queued",
            _rss,
            fmt="{:.1f}",
            depth=depths[0],
        )
        large = _row(
            records,
            "RSS.large",
            "Peak RSS",
            f"MB, {depths[1]:,} jobs queued",
            _rss,
            fmt="{:.1f}",
            depth=depths[1],
        )
        rows += [small, large, _growth(small, large, (depths[0], depths[1]))]
    return [r for r in rows if r is not None]


def _paired_ratio(
    records: list[Record], workload: str, side: str, value: Callable[[Record], float]
) -> float | None:
    """The median over repeats of side / plain aioworkers within each repeat: a slow
    stretch of the machine then weighs on both terms of a ratio, not on one median."""
    by_rep: dict[int, dict[str, float]] = {}
    for r in records:
        if r["workload"] == workload and not r["error"] and r["side"] in (side, "aioworkers"):
            by_rep.setdefault(r["rep"], {})[r["side"]] = value(r)
    ratios = [
        pair[side] / pair["aioworkers"]
        for pair in by_rep.values()
        if side in pair and pair.get("aioworkers")
    ]
    return statistics.median(ratios) if ratios else None


def summarize_otel(records: list[Record], modes: dict[str, str]) -> list[Row]:
    """For each OpenTelemetry side (``modes``: side name -> --otel mode) that ran, and W0
    and W1: medians, their ratios to the plain aioworkers side of the same run, and the
    throughput overhead ``1 - jobs/s ratio`` against the issue's target (W1). Ratios are
    medians of the per-repeat ratios."""
    ran = {r["side"] for r in records}
    rows = []
    for workload, label in OTEL_WORKLOADS.items():
        if not any(r["workload"] == workload for r in records):
            continue
        base_rate = _median(records, workload, "aioworkers", _rate, 0)
        base_cpu = _median(records, workload, "aioworkers", _cpu_us, 0)
        for side, mode in modes.items():
            if side not in ran:
                continue
            rate = _median(records, workload, side, _rate, 0)
            cpu = _median(records, workload, side, _cpu_us, 0)
            rate_ratio = _paired_ratio(records, workload, side, _rate)
            cpu_ratio = _paired_ratio(records, workload, side, _cpu_us)
            overhead = None if rate_ratio is None else 1 - rate_ratio
            limit = OTEL_OVERHEAD_TARGET[mode] if workload == "W1" else None
            rows.append(
                {
                    "key": f"{workload}.{side}",
                    "workload": workload,
                    "label": label,
                    "side": side,
                    "otel": mode,
                    "providers": OTEL_PROVIDERS[mode],
                    "rate": rate,
                    "cpu_us": cpu,
                    "aioworkers_rate": base_rate,
                    "aioworkers_cpu_us": base_cpu,
                    "rate_ratio": rate_ratio,
                    "cpu_ratio": cpu_ratio,
                    "overhead": overhead,
                    "target": "" if limit is None else f"overhead ≤ {limit:.0%}".replace("%", " %"),
                    "limit": limit,
                    "met": None if limit is None or overhead is None else overhead <= limit,
                }
            )
    return rows


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def markdown(rows: list[Row], meta: dict[str, Any], otel: list[Row] | None = None) -> str:
    preset = meta["preset"]
    broker = meta.get("broker", "redis")
    client = RAW_CLIENT.get(broker, broker)
    on = "" if broker == "redis" else f" on {broker}"
    rotating = len(meta.get("sides", ())) > 2
    order = "the sides' order rotating" if rotating else "sides alternating first"
    lines = [
        f"### aioworkers vs a raw {client} loop{on} ({meta['mode']})",
        "",
        f"{meta['time']} · {meta['cpus']} CPUs, load {meta['loadavg_start'][0]:.2f} → "
        f"{meta.get('loadavg_end', [0.0])[0]:.2f} · Python {meta['python']} · Redis "
        f"{meta['redis_server']} · redis-py {meta['versions'].get('redis')} · loop "
        f"{'/'.join(meta.get('loops', [])) or '?'} · aioworkers {meta['git']}",
        "",
        f"Median of {preset['repeat']} run(s) per side ({order}), each in a "
        "fresh process; concurrency "
        f"{preset['concurrency']} (W2: {preset['w2_concurrency']}).",
        "",
    ]
    if broker != "redis":
        skipped = [w for w in ("W0", "W1", "W2", "W3", "RSS") if w not in meta.get("workloads", [])]
        lines += [
            f"Completions counted in Redis, as on redis. W2: {preset['w2_jobs']:,} jobs of "
            f"sleep({preset['w2_sleep']}); W3: {preset['w3_rate']:g} jobs/s for "
            f"{preset['w3_seconds']:g} s."
            + (f" Not run on {broker}: {', '.join(skipped)}." if skipped else ""),
            "",
        ]
    lines += [
        f"| workload | metric | raw {client} | aioworkers | aioworkers / raw | target | met |",
        "|---|---|--:|--:|--:|---|---|",
    ]
    for r in rows:
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(
            f"| {r['label']} | {r['metric']} | {_cell(r['raw'], r['fmt'])} | "
            f"{_cell(r['aioworkers'], r['fmt'])} | {_cell(r['ratio'], '{:.2f}')} | "
            f"{r['target']} | {met} |"
        )
    if otel:
        lines += ["", *_otel_markdown(otel)]
    return "\n".join(lines) + "\n"


def _otel_markdown(rows: list[Row]) -> list[str]:
    lines = [
        "#### OpenTelemetry overhead",
        "",
        "Each side is aioworkers with OpenTelemetry configured as shown, against the plain "
        "aioworkers side (no provider) of the same run; jobs/s and CPU columns are medians, "
        "ratios are medians of the ratios within each repeat. Overhead is 1 - jobs/s ratio; "
        "`off` is aioworkers' own instrumentation disabled, with no provider either.",
        "",
        "| workload | side | SDK providers | jobs/s | aioworkers jobs/s | jobs/s ratio "
        "| CPU µs/job | aioworkers CPU µs/job | CPU ratio | overhead | target | met |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in rows:
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        overhead = "—" if r["overhead"] is None else f"{r['overhead']:+.1%}".replace("%", " %")
        lines.append(
            f"| {r['label']} | {r['side']} | {r['providers']} | {_cell(r['rate'], '{:,.0f}')} | "
            f"{_cell(r['aioworkers_rate'], '{:,.0f}')} | {_cell(r['rate_ratio'], '{:.3f}')} | "
            f"{_cell(r['cpu_us'], '{:.1f}')} | {_cell(r['aioworkers_cpu_us'], '{:.1f}')} | "
            f"{_cell(r['cpu_ratio'], '{:.3f}')} | {overhead} | {r['target']} | {met} |"
        )
    return lines


def write_chart(rows: list[Row], meta: dict[str, Any], path: Path) -> bool:
    """Three panels: throughput ratios with their targets, W3 latency, peak RSS."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_key = {r["key"]: r for r in rows}
    fig, (ratios, latency, memory) = plt.subplots(1, 3, figsize=(14, 4.2))
    client = RAW_CLIENT.get(meta.get("broker", "redis"), "redis.asyncio")
    fig.suptitle(f"aioworkers vs raw {client} loop ({meta['mode']}, {meta['time'][:10]})")

    bars = [
        (k, lbl, t)
        for k, lbl, t in (
            ("W0.rate", "W0 no-op\njobs/s", None),
            ("W1.rate", "W1 INCR\njobs/s", 0.6),
            ("W2.efficiency", "W2 sleep\nefficiency", 0.8),
        )
        if by_key.get(k, {}).get("ratio") is not None
    ]
    for i, (key, _label, target) in enumerate(bars):
        ratios.bar(i, by_key[key]["ratio"], color="tab:blue")
        ratios.text(
            i, by_key[key]["ratio"], f"{by_key[key]['ratio']:.2f}", ha="center", va="bottom"
        )
        if target is not None:
            ratios.hlines(target, i - 0.4, i + 0.4, colors="tab:red", linestyles="--")
    ratios.axhline(1.0, color="grey", linewidth=0.8)
    ratios.set_xticks(range(len(bars)), [b[1] for b in bars])
    ratios.set_title("aioworkers / raw (higher is better; red: target)")

    _grouped(latency, by_key, ["W3.p50", "W3.p99"], ["p50", "p99"])
    latency.set_ylim(0, max(latency.get_ylim()[1], P99_TARGET_MS * 1.2))
    latency.axhline(P99_TARGET_MS, color="tab:red", linestyle="--", linewidth=1)
    latency.set_title("W3 start - enqueued, ms (red: p99 target)")

    _grouped(
        memory, by_key, ["W1.rss", "RSS.small", "RSS.large"], ["W1", "small queue", "large queue"]
    )
    memory.set_title("peak worker RSS, MB")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _grouped(ax: Any, by_key: dict[str, Row], keys: list[str], labels: list[str]) -> None:
    present = [(k, lbl) for k, lbl in zip(keys, labels, strict=True) if k in by_key]
    for offset, side, color in ((-0.2, "raw", "tab:grey"), (0.2, "aioworkers", "tab:blue")):
        xs = [i + offset for i in range(len(present))]
        ys = [by_key[k][side] or 0.0 for k, _ in present]
        ax.bar(xs, ys, width=0.4, label=side, color=color)
    ax.set_xticks(range(len(present)), [lbl for _, lbl in present])
    top = max((by_key[k][s] or 0.0 for k, _ in present for s in ("raw", "aioworkers")), default=1)
    ax.set_ylim(0, top * 1.25 or 1)  # room for the legend above the bars
    ax.legend(loc="upper left", ncols=2)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git() -> str:
    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    return commit + ("+dirty" if git("status", "--porcelain") else "")


async def collect_meta(
    client: aioredis.Redis, args: argparse.Namespace, run_id: str, preset: dict[str, Any]
) -> dict[str, Any]:
    info = await client.info("server")
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": args.mode,
        "workloads": args.workloads,
        "sides": args.side_list,
        "broker": args.broker,
        "prefix": run_id,
        "preset": preset,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "redis_server": info.get("redis_version"),
        "versions": {
            name: _version(name) for name in ("aioworkers", "redis", "hiredis", "uvloop", "orjson")
        },
        "git": _git(),
    }
