"""`benchmarks/run.py --broker postgres` runs end to end in its smallest mode: the raw
asyncpg loop, aioworkers and, when installed (the ``bench`` extra), procrastinate, each job
done once, and no trial database left behind."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import asyncpg
import pytest

from ..benchmarks._script import run_script
from ..services import POSTGRES, POSTGRES_ADMIN_URL, ensure

PEER = importlib.util.find_spec("procrastinate") is not None


@pytest.mark.timeout(240)
async def test_smoke_run_on_postgres(tmp_path: Path) -> None:
    ensure(POSTGRES)
    sides = ["raw", "aioworkers"] + (["procrastinate"] if PEER else [])
    doc, stdout = run_script(
        "run.py",
        "--smoke",
        "--broker",
        "postgres",
        "--only",
        "W1,W3",
        "--sides",
        ",".join(sides),
        out=tmp_path,
        report="postgres-smoke-W1-W3",
        timeout=230,
    )
    records = doc["records"]
    assert {(r["workload"], r["side"]) for r in records} == {
        (w, s) for w in ("W1", "W3") for s in sides
    }
    for r in records:
        assert r["error"] is None, r
        assert r["counter"] == r["jobs"], r  # every job ran once
    if PEER:
        assert "| W1 | jobs/s, one INCR each |" in stdout
        assert "procrastinate / raw" in stdout
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        prefix = doc["meta"]["prefix"].replace("-", "_")
        left = await admin.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", f"{prefix}%"
        )
    finally:
        await admin.close()
    assert left == []
