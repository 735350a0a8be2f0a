"""The callgrind cost benchmark runs end to end in a small size against the real Redis:
it counts instructions per job, sees what a MeterProvider adds, and leaves no key.

About a minute (four valgrind runs, mostly the interpreter's start-up), hence ``slow``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import redis

from ._script import URL, run_script


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_metrics_cost_more_instructions_per_job_than_off(tmp_path: Path) -> None:
    args = ("--small", "200", "--large", "400", "--modes", "off,metrics")
    doc, _ = run_script("otel_cost.py", *args, out=tmp_path, report="otel-cost", timeout=170)
    per_job = {row["mode"]: row["instructions_per_job"] for row in doc["modes"]}
    assert set(per_job) == {"off", "metrics"}
    assert per_job["off"] > 0
    assert per_job["metrics"] > 0
    # A histogram record through the SDK per job costs tens of thousands of instructions;
    # identical runs' counts differ by a few hundred per job at these sizes.
    assert per_job["metrics"] > per_job["off"], per_job
    metrics = next(row for row in doc["modes"] if row["mode"] == "metrics")
    assert metrics["vs_off"] == per_job["metrics"] - per_job["off"]
    assert "| `metrics` |" in (tmp_path / "otel-cost.md").read_text()

    client = redis.Redis.from_url(URL)
    try:
        assert list(client.scan_iter(match=f"{doc['meta']['prefix']}:*")) == []
    finally:
        client.close()
