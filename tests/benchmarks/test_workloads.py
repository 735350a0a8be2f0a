"""W4 (one worker on 20 queues) and W5 (every job fails once) run end to end in the
smallest mode on Redis: aioworkers alone, every job done once, reported in the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._script import run_script


@pytest.mark.timeout(120)
def test_many_queues_and_retries_workloads(tmp_path: Path) -> None:
    doc, stdout = run_script(
        "run.py",
        "--smoke",
        "--only",
        "W4,W5",
        out=tmp_path,
        report="smoke-W4-W5",
        timeout=110,
    )
    records = doc["records"]
    # The raw loops have one queue and no retries: no raw side for these.
    assert {(r["workload"], r["side"]) for r in records} == {
        ("W4", "aioworkers"),
        ("W5", "aioworkers"),
    }
    for r in records:
        assert r["error"] is None, r
        assert r["counter"] == r["jobs"], r  # each job done once (W5: after its retry)
    rows = {row["key"]: row for row in doc["summary"]}
    for key in ("W4.rate", "W4.cpu", "W5.rate", "W5.cpu"):
        assert rows[key]["aioworkers"] is not None, key
        assert rows[key]["raw"] is None, key
    assert "| W4 20 queues |" in stdout
    assert "| W5 retries |" in stdout
