"""``aioworkers job`` and ``aioworkers cancel`` on a SQLite file (broker and store)."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

import pytest

from aioworkers import App, cli

APP = """
from aioworkers import App

app = App("sqlite:///{path}")


@app.task(result_ttl=3600, retries=0)
async def double(x: int) -> int:
    if x < 0:
        raise ValueError("negative")
    return 2 * x
"""


@pytest.fixture
def jobs_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    module = f"jobsapp_{tmp_path.name}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(APP.format(path=tmp_path / "j.db")))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("AIOWORKERS_BROKER_URL", raising=False)
    monkeypatch.delenv("AIOWORKERS_STORE_URL", raising=False)
    return module


def enqueue_and_run(module: str, args: list[int], cancel: bool = False) -> list[str]:
    mod = __import__(module)
    app: App = mod.app

    async def go() -> list[str]:
        jobs = [await app.enqueue("double", [x]) for x in args]
        if cancel:
            await jobs[-1].cancel()
        async with asyncio.timeout(20):
            await app.worker().run(burst=True)
        await app.aclose()
        return [j.id for j in jobs]

    return asyncio.run(go())


def test_job_shows_result_error_and_unknown(
    jobs_app: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ok, failed = enqueue_and_run(jobs_app, [21, -1])
    assert cli.main(["job", f"{jobs_app}:app", ok, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["status"], doc["result"], doc["task"], doc["attempt"]) == (
        "succeeded",
        42,
        "double",
        1,
    )
    assert cli.main(["job", f"{jobs_app}:app", failed]) == 0
    out = capsys.readouterr().out
    assert "failed" in out
    assert "ValueError" in out
    assert "negative" in out
    assert cli.main(["job", f"{jobs_app}:app", "0" * 32]) == 1
    assert "unknown" in capsys.readouterr().out


def test_cancel_from_the_command_line(jobs_app: str, capsys: pytest.CaptureFixture[str]) -> None:
    mod = __import__(jobs_app)

    async def enqueue() -> str:
        job = await mod.app.enqueue("double", [1])
        await mod.app.aclose()
        return str(job.id)

    job_id = asyncio.run(enqueue())
    assert cli.main(["cancel", f"{jobs_app}:app", job_id]) == 0
    assert "cancelled" in capsys.readouterr().out
    assert cli.main(["cancel", f"{jobs_app}:app", job_id]) == 1  # finished: nothing to cancel
    assert cli.main(["job", f"{jobs_app}:app", job_id, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "cancelled"
