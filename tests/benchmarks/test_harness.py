"""The benchmark harness runs end to end in its smallest mode, against the real Redis, so
it cannot rot: both sides, every workload, the report files, and no key left behind. On
SQLite too (no server beyond the Redis that counts completions): no file left behind."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import redis

from ._script import URL, run_script


@pytest.mark.timeout(180)
@pytest.mark.parametrize("broker", ["redis", "sqlite"])
def test_smoke_run_reports_every_workload_for_both_sides(tmp_path: Path, broker: str) -> None:
    name = "smoke" if broker == "redis" else f"{broker}-smoke"
    doc, stdout = run_script(
        "run.py", "--smoke", "--broker", broker, out=tmp_path, report=name, timeout=170
    )
    records = doc["records"]
    assert doc["meta"]["broker"] == broker
    assert {(r["workload"], r["side"]) for r in records} == {
        (w, s) for w in ("W0", "W1", "W2", "W3", "RSS") for s in ("raw", "aioworkers")
    }
    for r in records:
        assert r["error"] is None, r
        assert r["elapsed"] > 0
        assert r["maxrss_mb"] > 0
        if r["workload"] != "RSS":
            # Every job ran once: the counter the jobs (or the child, at the end) wrote.
            assert r["counter"] == r["jobs"], r
    for r in records:
        if r["workload"] == "W3":
            assert r["latency_ms"]["samples"] > 0

    rows = {row["key"]: row for row in doc["summary"]}
    for key in ("W0.rate", "W1.rate", "W2.efficiency", "W3.p99", "W1.rss", "RSS.growth"):
        assert rows[key]["raw"] is not None, key
        assert rows[key]["aioworkers"] is not None, key
    assert "| W1 no-op throughput |" in (tmp_path / f"{name}.md").read_text()
    assert "| W1 no-op throughput |" in stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (tmp_path / f"{name}.png").stat().st_size > 0

    client = redis.Redis.from_url(URL)
    try:
        assert list(client.scan_iter(match=f"{doc['meta']['prefix']}:*")) == []
    finally:
        client.close()
    # sqlite: each trial's database lived in a temporary directory named after the run.
    assert list(Path(tempfile.gettempdir()).glob(f"{doc['meta']['prefix']}-*")) == []


@pytest.mark.timeout(120)
def test_smoke_run_measures_otel_overhead_against_aioworkers(tmp_path: Path) -> None:
    args = ("--smoke", "--only", "W1", "--otel", "off,metrics", "--sides", "aioworkers")
    doc, stdout = run_script(
        "run.py", *args, out=tmp_path, report="smoke-W1-otel-off-metrics", timeout=110
    )
    records = doc["records"]
    # No raw side: --sides still selects, --otel adds its sides.
    assert {r["side"] for r in records} == {"aioworkers", "aio-off", "aio-metrics"}
    for r in records:
        assert r["error"] is None, r
        assert r["counter"] == r["jobs"], r
    assert doc["meta"]["otel"] == {"aio-off": "off", "aio-metrics": "metrics"}

    overhead = {(row["workload"], row["side"]): row for row in doc["otel_overhead"]}
    assert set(overhead) == {("W1", "aio-off"), ("W1", "aio-metrics")}
    for row in overhead.values():
        for field in ("rate", "cpu_us", "aioworkers_rate", "rate_ratio", "cpu_ratio", "overhead"):
            assert isinstance(row[field], float), (field, row)
            assert math.isfinite(row[field]), (field, row)
        assert row["overhead"] == pytest.approx(1 - row["rate_ratio"])
        assert row["met"] in (True, False)
    assert overhead["W1", "aio-off"]["limit"] == 0.02
    assert overhead["W1", "aio-metrics"]["limit"] == 0.10

    # The raw-vs-aioworkers table ignores the otel sides, and shows no raw figure.
    rows = {row["key"]: row for row in doc["summary"]}
    assert rows["W1.rate"]["raw"] is None
    assert rows["W1.rate"]["aioworkers"] is not None
    assert "OpenTelemetry overhead" in stdout
    assert "| W1 no-op throughput | aio-metrics |" in stdout

    client = redis.Redis.from_url(URL)
    try:
        assert list(client.scan_iter(match=f"{doc['meta']['prefix']}:*")) == []
    finally:
        client.close()
