"""``aioworkers web``: refuses to start without a login (unless read-only on loopback),
serves the dashboard with the login from the environment, and stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

APP = """
import aioworkers
app = aioworkers.App("sqlite:///{db}")

@app.task
async def hello(name: str) -> str:
    return "hi " + name
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOWORKERS_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env | extra


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "webapp.py").write_text(APP.format(db=tmp_path / "jobs.db"))
    subprocess.run(
        ["aioworkers", "enqueue", "webapp:app", "hello", "--args", '["x"]', "--create"],
        cwd=tmp_path,
        env=_env(tmp_path),
        check=True,
        capture_output=True,
    )
    return tmp_path


@contextmanager
def serving(project: Path, *args: str, **env: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        ["aioworkers", "web", "webapp:app", "--port", str(port), *args],
        cwd=project,
        env=_env(project, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the dashboard did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out


def run_web(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["aioworkers", "web", "webapp:app", *args],
        cwd=project,
        env=_env(project, **env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_refuses_to_start_without_a_login(project: Path) -> None:
    for args in ((), ("--host", "0.0.0.0", "--read-only")):
        done = run_web(project, *args, "--port", str(free_port()))
        assert done.returncode == 2, done.stderr
        assert "AIOWORKERS_WEB_USER" in done.stderr
        assert "AIOWORKERS_WEB_TOKEN" in done.stderr
    half = run_web(project, AIOWORKERS_WEB_USER="admin")
    assert half.returncode == 2
    assert "AIOWORKERS_WEB_PASSWORD" in half.stderr


def test_serves_with_the_login_from_the_environment(project: Path) -> None:
    login = {"AIOWORKERS_WEB_USER": "admin", "AIOWORKERS_WEB_PASSWORD": "pw-from-env"}
    with serving(project, **login) as url:
        assert httpx.get(url + "/").status_code == 401
        page = httpx.get(url + "/", auth=("admin", "pw-from-env"))
        assert page.status_code == 200
        assert 'data-field="ready">1<' in page.text


def test_read_only_on_loopback_needs_no_login(project: Path) -> None:
    with serving(project, "--read-only") as url:
        page = httpx.get(url + "/queues/default/dead")
        assert page.status_code == 200
        assert httpx.post(url + "/job/x/cancel", data={"csrf": "x"}).status_code == 403


def test_import_without_the_extra_names_it(tmp_path: Path) -> None:
    code = "import sys; sys.modules['starlette'] = None; import aioworkers.web"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=30
    )
    assert done.returncode == 1
    assert "pip install 'aio-job-workers[web]'" in done.stderr
