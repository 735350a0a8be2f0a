"""The command line as a user runs it: exit codes, one-line errors, signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from aioworkers import cli

APPS = Path(__file__).parent / "apps"


def aioworkers_cmd(
    *args: str, seed: str = "", timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aioworkers", *args],
        cwd=APPS,
        env=_env(seed),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _env(seed: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AIOWORKERS_BROKER_URL"}
    env["CLIAPP_SEED"] = seed
    return env


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "nosuchmodule:app"], "cannot import module 'nosuchmodule'"),
        (["run", "cliapp"], "expected MODULE:ATTR"),
        (["run", "cliapp:ap"], "has no attribute 'ap'; App objects there: app"),
        (["run", "cliapp:not_an_app"], "is a int, not an aioworkers.App"),
        (["run", "cliapp:app", "--broker", "kafka://u:hunter2@h"], "scheme must be one of"),
        (["run", "cliapp:app", "--concurrency", "0"], "--concurrency: must be >= 1"),
        (["run", "cliapp:app", "--grace", "soon"], "--grace: expected a number of seconds"),
        (["run", "cliapp:app", "--grace", "nan"], "--grace: expected a number of seconds"),
        (["enqueue", "cliapp:app", "nap", "--delay", "inf"], "--delay: expected a number"),
        (["run", "cliapp:app", "--max-job-seconds", "0"], "--max-job-seconds: must be > 0"),
        (["run", "cliapp:app", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "cliapp:app", "--log-level", "loud"], "--log-level: expected one of DEBUG"),
        (["frobnicate", "cliapp:app"], "invalid choice: 'frobnicate'"),
        (["enqueue", "cliapp:app", "nap", "--args", "[1"], "--args: not valid JSON"),
        (["enqueue", "cliapp:app", "nap", "--kwargs", "[]"], "expected a JSON dict"),
        (["enqueue", "cliapp:app", "nap", "--args", "[1]"], "memory:// broker lives inside"),
        (["dlq", "list"], "required: MODULE:ATTR"),
        (["stats", "cliapp:app", "--broker", "sqlite:///nowhere/jobs.db"], "no queue file at"),
        (["dlq", "list", "cliapp:app", "--broker", "sqlite:///nowhere/jobs.db"], "no queue file"),
        (
            ["enqueue", "cliapp:app", "nap", "--broker", "sqlite:///nowhere/jobs.db"],
            "no queue file",
        ),
        (["enqueue", "cliapp:app", "nap", "--broker", ""], "the broker URL is empty"),
        (["run", "cliapp:app", "--broker", " "], "the broker URL is empty"),
        (["stats", "cliapp:app", "--count", "2"], "--count needs --watch"),
        (["run", "cliapp:app", "--processes", "-1"], "0 (one per CPU) or more"),
    ],
)
def test_bad_invocations_fail_with_one_line_and_exit_2(argv: list[str], message: str) -> None:
    result = aioworkers_cmd(*argv)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("aioworkers: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr
    assert not (APPS / "nowhere").exists()  # reading created no empty queue file


def test_a_bad_broker_file_found_at_run_time_is_one_line_and_exit_2() -> None:
    result = aioworkers_cmd("run", "cliapp:app", "--burst", "--broker", "sqlite:///.")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("aioworkers: error: sqlite "), result.stderr
    assert "unable to open database file" in last
    assert "Traceback" not in result.stderr


def test_run_burst_runs_jobs_and_dead_letters_bad_ones() -> None:
    result = aioworkers_cmd("run", "cliapp:app", "--burst", seed="nap=0.01,nap=0.02,fail,garbage")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("nap done") == 2
    assert "ok=2 retried=0 dead=2 released=0" in result.stderr
    assert "dead-lettered (decode_error)" in result.stderr
    assert "dead-lettered (max_retries)" in result.stderr


def _start_worker(seed: str, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "aioworkers", "run", "cliapp:app", *extra],
        cwd=APPS,
        env=_env(seed),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the job is running
    assert line.startswith(("nap start", "tidy start")), line
    return proc


def test_sigterm_lets_the_job_in_flight_finish_and_exits_0() -> None:
    proc = _start_worker("nap=1.0", "--grace", "10")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "nap done 1.0" in out
    assert "SIGTERM: draining 1 jobs" in err
    assert "ok=1 retried=0 dead=0 released=0" in err


def test_sigint_then_second_signal_stops_now_and_releases() -> None:
    proc = _start_worker("tidy=30", "--grace", "30")  # a job that cleans up when cancelled
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    # The grace period starts once the fetchers have stopped, within the fetch's poll
    # (1 s): the second signal comes inside it.
    time.sleep(1.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 10
    assert "done" not in out
    assert "ok=0 retried=0 dead=0 released=1" in err
    assert "stopping now: cancelling 1 jobs" in err
    # The second signal cut the grace period short: it did not run out.
    assert "grace period over" not in err, err


def test_grace_expiry_releases_unfinished_jobs() -> None:
    proc = _start_worker("nap=30", "--grace", "0.5")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert "nap done" not in out
    assert proc.returncode == 0, err
    assert "grace period over: releasing 1 unfinished jobs" in err
    assert "ok=0 retried=0 dead=0 released=1" in err


def test_stats_json_has_one_shape_with_and_without_watch() -> None:
    once = aioworkers_cmd("stats", "cliapp:app", "--json")
    assert once.returncode == 0, once.stderr
    doc = orjson.loads(once.stdout)
    rates = {"enqueued": None, "done": None, "failed": None, "backlog": None}
    zero = {"ready": 0, "in_flight": 0, "delayed": 0, "dead": 0, "rates": rates}
    # cliapp's store is memory: this process lists no worker.
    workers = {"live": 0, "throttled": 0, "by_queue": {"default": 0, "other": 0}, "outcomes": {}}
    assert doc == {"ts": doc["ts"], "queues": {"default": zero, "other": zero}, "workers": workers}
    watched = aioworkers_cmd("stats", "cliapp:app", "--json", "--watch", "0.1", "--count", "2")
    assert watched.returncode == 0, watched.stderr
    first, second = (orjson.loads(line) for line in watched.stdout.splitlines())
    assert first | {"ts": None} == doc | {"ts": None}
    assert second.keys() == doc.keys()
    assert second["queues"].keys() == doc["queues"].keys()
    assert second["queues"]["default"].keys() == zero.keys()


def test_stats_of_a_queue_unknown_to_the_app_says_so() -> None:
    result = aioworkers_cmd("stats", "cliapp:app", "--queues", "nosuch,default")
    assert result.returncode == 0, result.stderr
    assert "queue 'nosuch' is unknown to the app (its queues: default, other)" in result.stderr
    assert "'default'" not in result.stderr
    dlq = aioworkers_cmd("dlq", "list", "cliapp:app", "--queue", "nosuch")
    assert "queue 'nosuch' is unknown to the app" in dlq.stderr


def test_version() -> None:
    import aioworkers

    result = aioworkers_cmd("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"aioworkers {aioworkers.__version__} (aio-job-workers)\n"


def test_log_lines_carry_the_pid_under_processes() -> None:
    result = aioworkers_cmd("run", "cliapp:app", "--processes", "1", "--burst", seed="nap=0.01")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if " aioworkers[" in line]
    pids = {line.split(" aioworkers[")[1].split("]")[0] for line in lines}
    assert len(pids) == 2, result.stderr  # the supervisor's and its child's
    assert all(" aioworkers[" in line for line in result.stderr.splitlines() if "INFO" in line)
    plain = aioworkers_cmd("run", "cliapp:app", "--burst")
    assert " aioworkers: worker started" in plain.stderr


def _import_cliapp() -> Any:
    sys.path.insert(0, str(APPS))
    try:
        import cliapp
    finally:
        sys.path.remove(str(APPS))
    return cliapp


def test_dlq_list_replay_purge_cover_every_queue_grouped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cliapp = _import_cliapp()
    app = cliapp.app

    async def seed_dead() -> tuple[list[str], list[str]]:
        ids = [await cliapp.fail.enqueue() for _ in range(3)]
        other = [await cliapp.fail_other.enqueue()]
        await app.worker(poll=0.05).run(burst=True)
        return ids, other

    ids, other = asyncio.run(seed_dead())
    assert cli.main(["dlq", "list", "cliapp:app", "--json"]) == 0
    listed = orjson.loads(capsys.readouterr().out)
    assert list(listed) == ["default", "other"]
    assert [d["id"] for d in listed["default"]] == ids
    assert [d["id"] for d in listed["other"]] == other
    assert {d["reason"] for d in listed["default"]} == {"max_retries"}
    assert all(d["error"] == "RuntimeError: always fails" for d in listed["default"])

    assert cli.main(["dlq", "list", "cliapp:app"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "default: 3 dead letters"
    assert text[4] == "other: 1 dead letter"
    assert text[5].startswith(f"  {other[0]}  fail_other  max_retries  attempts=1")

    assert cli.main(["dlq", "list", "cliapp:app", "--queue", "other", "--json"]) == 0
    assert list(orjson.loads(capsys.readouterr().out)) == ["other"]

    assert cli.main(["dlq", "replay", "cliapp:app", "--ids", ids[0]]) == 0
    out = capsys.readouterr().out
    assert "replayed 1 dead letter to 'default'" in out
    assert "replayed 0 dead letters to 'other'" in out
    assert asyncio.run(app.stats()).ready == 1

    assert cli.main(["dlq", "replay", "cliapp:app", "--queue", "other"]) == 0
    assert capsys.readouterr().out == "replayed 1 dead letter to 'other'\n"
    assert asyncio.run(app.stats("other")).ready == 1

    assert cli.main(["dlq", "purge", "cliapp:app"]) == 0
    out = capsys.readouterr().out
    assert "purged 2 dead letters from 'default'" in out
    assert "purged 0 dead letters from 'other'" in out
    assert asyncio.run(app.stats()).dead == 0


def test_dlq_replay_of_unknown_ids_says_which_and_exits_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cliapp = _import_cliapp()

    async def seed_dead() -> str:
        job_id = await cliapp.fail.enqueue()
        await cliapp.app.worker(poll=0.05).run(burst=True)
        return job_id

    job_id = asyncio.run(seed_dead())
    assert cli.main(["dlq", "replay", "cliapp:app", "--ids", f"nosuch,{job_id}"]) == 1
    out, err = capsys.readouterr()
    assert "replayed 1 dead letter to 'default'" in out
    assert "no dead letter with id 'nosuch' in queue 'default', 'other'" in err
    assert job_id not in err


# -- the embedded default: no job stranded in a file no worker reads ----------------------------


def _in_dir(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "AIOWORKERS_BROKER_URL"}
    base["PYTHONPATH"] = str(APPS)
    return subprocess.run(
        [sys.executable, "-m", "aioworkers", *args],
        cwd=cwd,
        env=base | (env or {}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_enqueue_refuses_a_missing_queue_file_unless_told_to_create_it(tmp_path: Path) -> None:
    db = tmp_path / "aioworkers.db"
    refused = _in_dir(tmp_path, "enqueue", "defaultapp:app", "greet", "--args", '["ann"]')
    assert refused.returncode == 2, refused.stderr
    assert f"no queue file at {db}" in refused.stderr
    assert "--create" in refused.stderr
    assert refused.stdout == ""  # no job id: nothing was enqueued
    assert not db.exists()

    created = _in_dir(
        tmp_path, "enqueue", "defaultapp:app", "greet", "--args", '["ann"]', "--create"
    )
    assert created.returncode == 0, created.stderr
    assert len(created.stdout.strip()) > 10  # the job id
    warnings = [line for line in created.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, created.stderr
    assert f"created the new SQLite file {db}" in warnings[0]

    # The file exists now: the worker finds the job and says nothing about creating.
    ran = _in_dir(tmp_path, "run", "defaultapp:app", "--burst")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "hello ann\n"
    assert "created" not in ran.stderr


def test_an_empty_broker_url_in_the_environment_is_an_error(tmp_path: Path) -> None:
    result = _in_dir(tmp_path, "stats", "defaultapp:app", env={"AIOWORKERS_BROKER_URL": ""})
    assert result.returncode == 2, result.stderr
    assert "AIOWORKERS_BROKER_URL is set but empty" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "aioworkers.db").exists()


def test_an_empty_broker_url_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from aioworkers import App, ConfigError

    with pytest.raises(ConfigError, match="the broker URL is empty"):
        App("")
    monkeypatch.setenv("AIOWORKERS_BROKER_URL", "")
    with pytest.raises(ConfigError, match="AIOWORKERS_BROKER_URL is set but empty"):
        App()


async def test_the_process_that_creates_a_queue_file_says_where_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from aioworkers import App

    db = tmp_path / "sub" / "jobs.db"
    for _ in range(2):
        app = App(f"sqlite:///{db}")

        @app.task
        async def noop() -> None: ...

        async with app:
            await noop.enqueue()
    created = [r for r in caplog.records if "created the new SQLite file" in r.getMessage()]
    assert [(r.levelname, str(db) in r.getMessage()) for r in created] == [("WARNING", True)]


def test_dlq_replay_under_a_live_worker_replays_the_letters_it_found_once(tmp_path: Path) -> None:
    """The worker kills every replayed job again at once: a replay that kept listing until
    the DLQ looked empty would chase those and replay jobs twice (or never end)."""
    n = 1500  # more than one listing page (1,000)
    from aioworkers import App

    async def seed() -> None:
        app = App(f"sqlite:///{tmp_path / 'aioworkers.db'}")

        @app.task(retries=0)
        async def boom(n: int) -> None:
            raise ValueError(f"boom {n}")

        async with app:
            await app.enqueue_many(boom.call(i) for i in range(n))
            await app.worker(poll=0.05).run(burst=True)
            assert (await app.stats()).dead == n

    asyncio.run(seed())
    worker = subprocess.Popen(
        [sys.executable, "-m", "aioworkers", "run", "defaultapp:app", "--log-level", "ERROR"],
        cwd=tmp_path,
        env={**_env(""), "PYTHONPATH": str(APPS)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        replay = _in_dir(tmp_path, "dlq", "replay", "defaultapp:app")
        assert replay.returncode == 0, replay.stderr
        assert replay.stdout == f"replayed {n} dead letters to 'default'\n"
        _wait_until(lambda: _stats(tmp_path)["dead"] == n)
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=30)
    runs = out.splitlines()
    # Each letter ran once more, and died again: none was replayed twice.
    assert sorted(runs) == sorted(f"boom {i}" for i in range(n))
    assert _stats(tmp_path) == {"ready": 0, "in_flight": 0, "delayed": 0, "dead": n}


def _stats(cwd: Path) -> dict[str, int]:
    result = _in_dir(cwd, "stats", "defaultapp:app", "--json")
    assert result.returncode == 0, result.stderr
    doc: dict[str, int] = orjson.loads(result.stdout)["queues"]["default"]
    del doc["rates"]
    return doc


def _wait_until(check: Callable[[], bool], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within}s"
        time.sleep(0.1)


# -- --key on a task that ignores it ---------------------------------------------------------


async def test_a_key_given_to_a_task_that_is_not_idempotent_warns_once_per_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aioworkers import App

    app = App("memory://")

    @app.task
    async def plain() -> None: ...

    @app.task(idempotent=True)
    async def keyed() -> None: ...

    async with app:
        for _ in range(2):
            await plain.options(key="k").enqueue()
            await app.enqueue("plain", key="k2")
            await keyed.options(key="k").enqueue()
        await plain.enqueue()  # no key: nothing to say
    warned = [r for r in caplog.records if "key" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert warned[0].levelname == "WARNING"
    assert "task 'plain' is not idempotent=True" in warned[0].getMessage()


def test_enqueue_key_help_says_what_it_does() -> None:
    result = aioworkers_cmd("enqueue", "--help")
    text = " ".join(result.stdout.split())
    assert "only with a task registered idempotent=True" in text


# -- a user's module that fails on import --------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "frames", "error"),
    [
        ("brokenapp:app", ["in <module>", "in load_settings"], "KeyError: 'BROKENAPP_SMTP_HOST'"),
        (
            "needsdep:app",
            ["in <module>"],
            "ModuleNotFoundError: No module named 'no_such_dependency_for_aioworkers_tests'",
        ),
        ("badtask:app", ["in <module>"], "ConfigError: retries must be >= 0, got -1"),
    ],
)
def test_a_module_that_raises_on_import_shows_the_users_traceback_and_exits_2(
    spec: str, frames: list[str], error: str
) -> None:
    result = aioworkers_cmd("run", spec)
    assert result.returncode == 2, result.stderr
    err = result.stderr
    module = spec.partition(":")[0]
    assert err.startswith("Traceback (most recent call last):\n"), err
    assert f'File "{APPS / module}.py", line ' in err
    for frame in frames:
        assert frame in err
    # Only the user's frames: neither aioworkers' own nor the import machinery's.
    assert "importlib" not in err
    assert f"{os.sep}aioworkers{os.sep}" not in err
    assert error in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"aioworkers: error: importing {module!r} failed: {error}")


def test_burst_leaves_delayed_jobs_for_a_later_run_and_says_how_many() -> None:
    # Before: --burst waited for the job due in 60 s (past this call's timeout).
    result = aioworkers_cmd("run", "cliapp:app", "--burst", seed="nap=0.01,later=60", timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("nap done") == 1
    assert "1 delayed job left for a later run" in result.stderr
    assert "--wait-delayed" in result.stderr


def test_burst_with_wait_delayed_runs_the_delayed_jobs_too() -> None:
    result = aioworkers_cmd("run", "cliapp:app", "--burst", "--wait-delayed", seed="later=0.3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("nap done") == 1
    assert "left for a later run" not in result.stderr
