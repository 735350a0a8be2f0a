"""Every example runs end to end, as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AIOWORKERS_BROKER_URL"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(COVERED)


def test_quickstart() -> None:
    result = run_example("quickstart.py")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "enqueued 103 jobs" in out
    assert "sent 101 emails" in out
    assert "'ok': 102" in out
    assert "'dead': 1" in out
    assert "ready=0, in_flight=0, delayed=0, dead=1" in out
    assert "charge_card after 3 attempts: ValueError: card declined (attempt 3)" in out


COVERED = {"quickstart.py": test_quickstart}
