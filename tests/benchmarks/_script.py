"""Run a benchmark script as a user would, against the local Redis, and read its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..services import REDIS, ensure

ROOT = Path(__file__).resolve().parents[2]
URL = f"redis://{REDIS.host}:{REDIS.port}/0"


def run_script(name: str, *args: str, out: Path, report: str, timeout: float) -> tuple[Any, str]:
    """``python benchmarks/<name> ARGS --url <local Redis> --out <out>``; once it exited 0,
    the JSON report ``<out>/<report>.json`` and what it printed."""
    ensure(REDIS)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args, "--url", URL, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / f"{report}.json").read_text()), proc.stdout
